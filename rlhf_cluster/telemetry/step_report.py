"""One learner step's row: the batch's statistics, the learner's metrics and the job's counters,
as written to `metrics.jsonl` (and, through `metrics.STEP_GAUGES` and `STEP_LABELLED_GAUGES`, to
Prometheus)."""

from __future__ import annotations

import statistics
import time

from rlhf_cluster.experience.records import ScoredSample
from rlhf_cluster.telemetry.rollout_stats import rollout_stats


def step_row(
    step: int, samples: list[ScoredSample], stats: dict[str, float], seconds: float, counters: dict[str, float]
) -> dict:
    """The row of `step`: trained on `samples`, with the learner's `stats` and the job's `counters`
    (buffer depth, drops, restarts); `seconds` since the previous step ended."""
    rewards = [s.reward for s in samples]
    staleness = [s.staleness(step) for s in samples]
    row = {
        "step": step,
        "weight_version": step + 1,
        "reward_mean": statistics.fmean(rewards),
        "reward_std": statistics.pstdev(rewards),
        "kl": stats["policy/kl"],
        "staleness_mean": statistics.fmean(staleness),
        "staleness_max": max(staleness),
        "step_seconds": seconds,
        "learner_seconds": stats["learner/step_seconds"],
        "samples": len(samples),
        "response_len_mean": statistics.fmean(len(s.response_ids) for s in samples),
        **rollout_stats(samples),  # length percentiles, truncation, reward spread, diversity
        **counters,
        "reward_failures": sum(s.reward_components.get("reward_failed", 0.0) for s in samples),
        "multi_version_fraction": statistics.fmean(s.spans_versions for s in samples),
        "time": time.time(),
    }
    row.update({k: v for k, v in stats.items() if k not in row})
    return row


def console_line(row: dict) -> str:
    return (
        f"step {row['step']:4d} | version {row['weight_version']:4d} | reward {row['reward_mean']:+.3f} | "
        f"kl {row['kl']:.5f} | staleness {row['staleness_mean']:.2f} (max {row['staleness_max']}) | "
        f"step {row['step_seconds']:.2f}s"
    )
