"""What a judge reward (a `judge` source in `scoring.rewards`) must meet: a template whose
placeholders a sample fills (`rules`), and a judge model folder (`folder_problems`); preflight
runs both, so `--dry-run` and the driver refuse a bad judge before anything starts."""

from __future__ import annotations

from rlhf_cluster.config import JobConfig, JudgeReward
from rlhf_cluster.scoring.judge import check_template


def _where(cfg: JobConfig) -> tuple[str, JudgeReward] | None:
    for i, source in enumerate(cfg.scoring.rewards):
        if isinstance(source, JudgeReward):
            return f"scoring.rewards[{i}] (judge {source.name!r})", source
    return None


def rules(cfg: JobConfig) -> list[str]:
    found = _where(cfg)
    if found is None:
        return []
    where, judge = found
    try:
        check_template(judge.template, judge.group)
    except ValueError as exc:
        return [f"{where}.template: {exc}"]
    return []


def folder_problems(cfg: JobConfig) -> list[str]:
    found = _where(cfg)
    if found is None:
        return []
    from rlhf_cluster.job.validation import validate_model_dir

    where, judge = found
    try:
        validate_model_dir(judge.model)
    except (OSError, ValueError) as exc:
        return [f"{where}.model: {exc}"]
    return []
