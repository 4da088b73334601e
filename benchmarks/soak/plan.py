"""The soak's fault kinds and its schedule (issue 58): the schedule comes from
the seed alone, so a run that broke an invariant can be replayed fault for fault
(`python -m benchmarks.soak --plan-only`; tests/unit/test_soak_schedule.py)."""

from __future__ import annotations

import random
from dataclasses import dataclass

# kind -> (the pool it hits, the events.jsonl kinds that detect it)
FAULTS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "kill_generation": ("generation", ("worker_replaced",)),
    "stop_generation": ("generation", ("worker_hung",)),
    "kill_reward": ("reward", ("worker_replaced",)),
    "stop_reward": ("reward", ("worker_hung",)),
    "kill_reference": ("reference", ("worker_replaced",)),
    "stop_reference": ("reference", ("worker_hung",)),
    "kill_learner": (None, ("learner_rebuilt",)),
    "stop_learner": (None, ("learner_rebuilt",)),
    "push_interrupted": ("generation", ("worker_replaced",)),
    "raylet_restart": ("generation", ("worker_replaced",)),
    "driver_sigterm": (None, ("resumed",)),
    "reward_failing": (None, ("reward_failed",)),
    "reward_hanging": (None, ("reward_failed",)),
    "disk_full": (None, ("disk_full",)),
    "scale_generation": ("generation", ("scaled",)),
}
CLASS_OF = {"generation": "GenerationWorker", "reward": "RewardWorker", "reference": "ReferenceWorker"}
RECOVERY_BOUND_S = 300.0  # a fault not detected, or not followed by a step, within this is reported as such


@dataclass(frozen=True)
class Planned:
    gap_s: float  # after the previous fault's planned time
    kind: str
    pick: int  # which worker of the pool (index into the live ones, modulo their count)
    hold_s: float  # how long a lasting fault lasts (a stopped raylet, a failing reward, a full disk)


def plan(seed: int, minutes: float, faults: int, kinds: list[str]) -> list[Planned]:
    """The fault schedule, from the seed alone: rounds of every kind in a seeded order, at gaps
    averaging the run's length over `faults` + 1."""
    rng = random.Random(seed)
    mean = minutes * 60 / (faults + 1)
    out: list[Planned] = []
    while len(out) < faults:
        for kind in rng.sample(kinds, len(kinds)):
            out.append(Planned(rng.uniform(0.5, 1.5) * mean, kind, rng.randrange(1000), rng.uniform(8, 20)))
    return out[:faults]
