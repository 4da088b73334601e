"""Learning-rate schedules as one pure function of the step, shared by every optimizer in the project
(RL learner on FSDP2 or DeepSpeed, supervised stages)."""

from __future__ import annotations

import math


def lr_multiplier(
    step: int, warmup_steps: int = 0, total_steps: int | None = None, schedule: str = "constant", min_ratio: float = 0.0
) -> float:
    """The factor on the peak learning rate for optimizer step `step` (0-based).

    Linear warm-up over `warmup_steps` (step 0 already takes 1/warmup of the peak), then `constant`
    (1.0), or `cosine` or `linear` from 1.0 down to `min_ratio` at step `total_steps - 1` (and
    `min_ratio` past it).
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule not in ("cosine", "linear"):
        raise ValueError(f"lr schedule must be 'constant', 'cosine' or 'linear', got {schedule!r}")
    if total_steps is None:
        raise ValueError(f"the {schedule} schedule needs total_steps")
    span = max(total_steps - 1 - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    falling = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * falling
