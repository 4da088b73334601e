"""What a judge reward (a `judge` source in `scoring.rewards`) must meet: a template whose
placeholders a sample fills (`rules`), and a judge model folder (`folder_problems`); preflight
runs both, so `--dry-run` and the driver refuse a bad judge before anything starts."""

from __future__ import annotations

from collections.abc import Callable

from rlhf_cluster.config import JobConfig, JudgeReward
from rlhf_cluster.scoring.judge import check_template


def _refusal(
    cfg: JobConfig, field: str, check: Callable[[JudgeReward], object], errors: tuple[type[Exception], ...]
) -> list[str]:
    """`check` run on the job's judge source, if it has one: what it raises (of `errors`) as a
    problem naming the source and its `field`."""
    for i, source in enumerate(cfg.scoring.rewards):
        if isinstance(source, JudgeReward):
            try:
                check(source)
            except errors as exc:
                return [f"scoring.rewards[{i}] (judge {source.name!r}).{field}: {exc}"]
            return []
    return []


def rules(cfg: JobConfig) -> list[str]:
    return _refusal(cfg, "template", lambda judge: check_template(judge.template, judge.group), (ValueError,))


def folder_problems(cfg: JobConfig) -> list[str]:
    from rlhf_cluster.job.validation import validate_model_dir

    return _refusal(cfg, "model", lambda judge: validate_model_dir(judge.model), (OSError, ValueError))
