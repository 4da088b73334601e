"""What a recorded run trained on, step by step, read back from its run directory: the batches
`rlhf-cluster replay` trains again without generation. Ray-free."""

from __future__ import annotations

from pathlib import Path

from rlhf_cluster.config import JobConfig, load_config
from rlhf_cluster.experience.records import ScoredSample
from rlhf_cluster.fileio import read_jsonl
from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.run.scored_log import ScoredLog


def recorded_config(run_dir: Path) -> JobConfig:
    path = run_dir / RunDir.CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (is {run_dir} the run directory of a job?)")
    return load_config(path)


def recorded_batches(run_dir: Path, steps: tuple[int, int] | None = None) -> dict[int, list[ScoredSample]]:
    """Each step's batch (steps A..B, or all), in the order the step trained on it: the samples
    consumed.jsonl names, read from the scored log the run kept with `train.record_rollouts`."""
    consumed_path = run_dir / RunDir.CONSUMED
    if not consumed_path.exists():
        raise FileNotFoundError(f"{consumed_path}: not found (did the run train a step?)")
    order: dict[int, list[str]] = {}
    for row in read_jsonl(consumed_path).rows:  # a torn final line (a crash mid-append) is left out
        order.setdefault(row["step"], []).append(row["sample_id"])
    first, last = steps if steps is not None else (0, max(order))
    wanted = [s for s in range(first, last + 1)]
    if not wanted or any(s not in order for s in wanted):
        raise ValueError(f"steps {first}..{last}: the run trained steps {min(order)}..{max(order)}")
    by_id = {s.sample_id: s for _, group in ScoredLog(run_dir / RunDir.SCORED_LOG).since(0) for s in group}
    batches = {}
    for step in wanted:
        missing = [i for i in order[step] if i not in by_id]
        if missing:
            raise ValueError(
                f"step {step}: {len(missing)} of its samples are not in {run_dir / RunDir.SCORED_LOG} "
                "(record the run with --record-rollouts / train.record_rollouts: true)"
            )
        batches[step] = [by_id[i] for i in order[step]]
    return batches
