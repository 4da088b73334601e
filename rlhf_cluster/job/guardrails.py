"""Guardrails: which evaluation is the best so far (its checkpoint is kept, `guardrails.keep_best`),
when a run should stop (`patience`, `target`), and when it should roll back to its last good
checkpoint with adjusted settings (`guardrails.rollback`; the settings ride as a `JobOverride`,
the job's config is never changed).

Pure bookkeeping: the driver feeds it each step's row and evaluation and acts on the verdicts. The
evaluation history is replayed from the kept metrics rows on resume.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from rlhf_cluster.config import DataConfig, GuardrailsConfig, JobConfig, RollbackConfig
from rlhf_cluster.data.prompt_files import as_paths, file_labels
from rlhf_cluster.job.override import JobOverride

log = logging.getLogger(__name__)

_METRIC = re.compile(
    r"eval_accuracy|eval_sampled_accuracy|eval_reward_mean|eval_sampled_reward_mean|eval_pass@(\d+)|eval_accuracy/.+"
)


def metric_problem(metric: str, data: DataConfig) -> str | None:
    """Why `metric` names no column the job's evaluation reports (None: it does)."""
    match = _METRIC.fullmatch(metric)
    if match is None:
        return (
            f"guardrails.metric={metric!r}: not an evaluation column; use eval_accuracy, eval_sampled_accuracy, "
            "eval_reward_mean, eval_sampled_reward_mean, eval_pass@<k> or eval_accuracy/<source>"
        )
    sampled = metric in ("eval_sampled_accuracy", "eval_sampled_reward_mean") or match.group(1) is not None
    if sampled and not data.eval_samples:
        return f"guardrails.metric={metric!r} comes from sampled answers, and data.eval_samples is 0"
    if match.group(1) is not None and int(match.group(1)) not in data.eval_pass_k:
        return f"guardrails.metric={metric!r}: k={match.group(1)} is not in data.eval_pass_k={data.eval_pass_k}"
    if metric.startswith("eval_accuracy/") and data.columns.source is None:
        labels = _held_out_labels(data)
        if not labels:
            return (
                f"guardrails.metric={metric!r} is a per-source accuracy, and data.columns.source names no column "
                "(nor are the held-out prompts from several files, each its own source)"
            )
        if metric.removeprefix("eval_accuracy/") not in labels:
            return f"guardrails.metric={metric!r}: the held-out prompts' sources are their files' labels {labels}"
    return None


def _held_out_labels(data: DataConfig) -> list[str]:
    """The sources of held-out prompts that carry their file's label (`prompt_files.py`): from
    several `eval_path` files, or held out (a fraction) of several `path` files; else none."""
    held_out = data.eval_path if data.eval_path is not None else data.path if data.eval_fraction else None
    files = as_paths(held_out)
    return file_labels(files) if len(files) > 1 else []


@dataclass(frozen=True)
class GuardVerdict:
    """What one evaluation means for the run."""

    step: int
    value: float
    improved: bool  # better than every earlier evaluation by more than min_delta (the first always is)
    stop: str | None  # why the run should stop now, or None


class EvalGuard:
    """Tracks `guardrails.metric` over a run's evaluations and judges each new one."""

    def __init__(self, cfg: GuardrailsConfig):
        self.cfg = cfg
        self.best: float | None = None
        self.best_step: int | None = None
        self.since_best = 0  # evaluations since the best one
        self.unmeasured = False  # an evaluation ran without the metric (said once)

    def _better(self, value: float, than: float) -> bool:
        gain = value - than if self.cfg.higher_is_better else than - value
        return gain > self.cfg.min_delta

    def observe(self, step: int, metrics: dict) -> GuardVerdict | None:
        """The verdict on step `step`'s evaluation; None when `metrics` holds no evaluation of the metric."""
        value = metrics.get(self.cfg.metric)
        if value is None:
            if self.cfg.active and "eval_reward_mean" in metrics and not self.unmeasured:
                self.unmeasured = True
                log.warning(
                    f"guardrails.metric={self.cfg.metric}: the evaluation after step {step} does not report it, and "
                    "the guardrails skip such an evaluation: accuracy needs a reward that says whether an answer is "
                    "right (a `correct` or verl's `acc` component: a function returning a number says not), and an "
                    "evaluation whose every reward failed says nothing; watch eval_reward_mean for the former "
                    "(said once)"
                )
            return None
        value = float(value)
        improved = self.best is None or self._better(value, self.best)
        if improved:
            self.best, self.best_step, self.since_best = value, step, 0
        else:
            self.since_best += 1
        stop = None
        target = self.cfg.target
        if target is not None and (value >= target if self.cfg.higher_is_better else value <= target):
            stop = f"guardrails.target: {self.cfg.metric} = {value:.4g} at step {step} reached {target:g}"
        elif self.cfg.patience is not None and self.since_best >= self.cfg.patience:
            stop = (
                f"guardrails.patience: {self.cfg.metric} has not improved on {self.best:.4g} (step {self.best_step}) "
                f"for {self.since_best} evaluations"
            )
        return GuardVerdict(step, value, improved, stop)

    def replay(self, rows: Iterable[dict]) -> None:
        """Rebuild the state from a resumed run's kept metrics rows (their evaluations, in order)."""
        for row in rows:
            self.observe(int(row["step"]), row)


def policy_held(stats: Mapping[str, Any]) -> bool:
    """Whether a step's stats (or its row) are a critic warm-up step's (`critic.freeze_policy_steps`:
    `policy/updated` 0): the policy did not update, so nothing reads it as a policy step. Its
    `policy/kl` (the row's `kl`) is the rollouts' log-probs' against the reference (engine
    numerics, sampling filters), not a move of the policy: the KL controller does not observe it and
    `guardrails.rollback.kl_above` does not act on it; it skipped no update (`faults.max_bad_steps`)."""
    return stats.get("policy/updated") == 0.0


# A step row's column each per-step rollback condition reads, and whether it trips above or below.
_STEP_CONDITIONS = {
    "kl_above": ("kl", 1),
    "mismatch_above": ("correction/mismatch_k3", 1),
    "entropy_below": ("policy/entropy", -1),
    "response_length_above": ("response_len_mean", 1),
}


class RollbackGuard:
    """Decides when a run rolls back (`guardrails.rollback`), to which checkpoint, with what settings."""

    def __init__(self, cfg: RollbackConfig, metric: str, higher_is_better: bool):
        self.cfg, self.metric, self.higher_is_better = cfg, metric, higher_is_better
        self.rollbacks = 0

    def tripped(self, row: dict, eval_guard: EvalGuard, verdict: GuardVerdict | None) -> str | None:
        """The condition step `row` meets, named with its value and bound (None: none)."""
        for name, (column, sign) in _STEP_CONDITIONS.items():
            bound = getattr(self.cfg, name)
            value = None if column == "kl" and policy_held(row) else row.get(column)
            if bound is not None and value is not None and sign * (value - bound) > 0:
                return f"guardrails.rollback.{name}={bound:g}: {column} = {value:.4g} at step {row['step']}"
        drop = self.cfg.eval_drop
        if drop is not None and verdict is not None and eval_guard.best is not None:
            worse = eval_guard.best - verdict.value if self.higher_is_better else verdict.value - eval_guard.best
            if worse > drop:
                return (
                    f"guardrails.rollback.eval_drop={drop:g}: {self.metric} = {verdict.value:.4g} at step "
                    f"{verdict.step}, "
                    f"{worse:.4g} below the best {eval_guard.best:.4g} (step {eval_guard.best_step})"
                )
        return None

    def replay(self, events: Iterable[dict], cfg: JobConfig) -> JobOverride:
        """A resumed run's rollbacks so far, from the events.jsonl rows it keeps (each rollback's row
        carries the step the run continued from, so it outlives a resume that keeps that step):
        `max_rollbacks` bounds the run, not each process that runs it, and the run goes on with
        their adjustments: the override of `cfg` (this job's config) by each kept rollback's factors."""
        self.rollbacks = sum(1 for e in events if e.get("event") == "guardrails" and "rollback" in e.get("actions", ()))
        return self._scaled(JobOverride(), cfg, self.rollbacks)

    def last_good_step(self, trigger_step: int, reason: str) -> int:
        """The newest step whose checkpoint may be restored: a step's figures judge the weights it
        trained on, those of the step before (an evaluation judges its own step's), so the
        checkpoint of the step before the trigger is suspect too."""
        return trigger_step - 1 if reason.startswith("guardrails.rollback.eval_drop") else trigger_step - 2

    def adjusted(self, override: JobOverride, cfg: JobConfig, reason: str) -> JobOverride:
        """`override` (what the run changed so far of `cfg`, the job's config) with the rollback's
        adjustments (learner.lr x lr_factor, algorithm.kl.coef x kl_coef_factor), or an error
        when the rollbacks are used up."""
        if self.rollbacks >= self.cfg.max_rollbacks:
            raise RuntimeError(
                f"{reason}; giving up: the {self.cfg.max_rollbacks} rollbacks allowed "
                "(guardrails.rollback.max_rollbacks) are used up"
            )
        self.rollbacks += 1
        return self._scaled(override, cfg, 1)

    def _scaled(self, override: JobOverride, cfg: JobConfig, times: int) -> JobOverride:
        """`override` after `times` more rollbacks: the learner.lr and algorithm.kl.coef it runs
        with, x lr_factor and x kl_coef_factor each time."""
        if times == 0:
            return override
        now = override.apply(cfg)
        return override.with_rollback(
            lr=now.learner.lr * self.cfg.lr_factor**times,
            kl_coef=now.algorithm.kl.coef * self.cfg.kl_coef_factor**times,
        )
