"""Guardrails on the periodic evaluation: which evaluation is the best so far (its checkpoint is
kept, `guardrails.keep_best`) and when a run should stop (`patience`, `target`).

Pure bookkeeping: the driver feeds it each evaluation's metrics and acts on the verdict. Its state is
the run's evaluation history, so a resumed run rebuilds it by replaying the kept metrics rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from rlhf_cluster.config import DataConfig, GuardrailsConfig

_METRIC = re.compile(r"eval_accuracy|eval_sampled_accuracy|eval_reward_mean|eval_pass@(\d+)|eval_accuracy/.+")


def metric_problem(metric: str, data: DataConfig) -> str | None:
    """Why `metric` names no column the job's evaluation reports (None: it does)."""
    match = _METRIC.fullmatch(metric)
    if match is None:
        return (f"guardrails.metric={metric!r}: not an evaluation column; use eval_accuracy, eval_sampled_accuracy, "
                "eval_reward_mean, eval_pass@<k> or eval_accuracy/<source>")
    sampled = metric == "eval_sampled_accuracy" or match.group(1) is not None
    if sampled and not data.eval_samples:
        return f"guardrails.metric={metric!r} comes from sampled answers, and data.eval_samples is 0"
    if match.group(1) is not None and int(match.group(1)) not in data.eval_pass_k:
        return f"guardrails.metric={metric!r}: k={match.group(1)} is not in data.eval_pass_k={data.eval_pass_k}"
    if metric.startswith("eval_accuracy/") and data.columns.source is None:
        return f"guardrails.metric={metric!r} is a per-source accuracy, and data.columns.source names no column"
    return None


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

    def _better(self, value: float, than: float) -> bool:
        gain = value - than if self.cfg.higher_is_better else than - value
        return gain > self.cfg.min_delta

    def observe(self, step: int, metrics: dict) -> GuardVerdict | None:
        """The verdict on step `step`'s evaluation; None when `metrics` holds no evaluation of the metric."""
        value = metrics.get(self.cfg.metric)
        if value is None:
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
            stop = (f"guardrails.patience: {self.cfg.metric} has not improved on {self.best:.4g} (step {self.best_step}) "
                    f"for {self.since_best} evaluations")
        return GuardVerdict(step, value, improved, stop)

    def replay(self, rows: Iterable[dict]) -> None:
        """Rebuild the state from a resumed run's kept metrics rows (their evaluations, in order)."""
        for row in rows:
            self.observe(int(row["step"]), row)

