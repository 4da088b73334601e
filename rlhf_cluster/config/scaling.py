"""`scaling`: how the job sizes its pools while it runs. `scaling.auto.<pool>` turns on the
closed-loop autoscaler (`rlhf_cluster/job/autoscale.py`) for one pool, within its bounds.

Every pool is off by default: a job without `scaling` keeps the sizes it started with, changed
only by `rlhf-cluster scale`. The rule the settings steer is documented in docs/operations.md
("Autoscaling").
"""

from __future__ import annotations

from pydantic import Field, model_validator

from rlhf_cluster.config.base import _Strict


class PoolAutoscale(_Strict):
    """The autoscaler's bounds and thresholds for one pool. It decides on the mean of the last
    `window` steps measured since the last change of any pool (the hysteresis), changes a pool by
    one worker at a time, and never changes it twice within `cooldown_s`."""

    enabled: bool = Field(False, description="Let the autoscaler resize this pool (off: its size is the operator's).")
    min_replicas: int = Field(1, ge=1, description="The autoscaler never shrinks the pool below this.")
    max_replicas: int = Field(4, ge=1, description="The autoscaler never grows the pool above this.")
    grow_wait_s: float = Field(
        0.5,
        ge=0,
        description="Grow only while the learner waited longer than this for its batch (`learner_wait_seconds`, "
        "the window's mean): the buffer runs dry, some pool upstream is short.",
    )
    busy_high: float = Field(
        0.8,
        gt=0,
        le=1,
        description="...and this pool's busy share (`busy_<pool>`, the window's mean) is at least this: it is the "
        "short one. Of the pools that qualify, the busiest grows.",
    )
    busy_low: float = Field(
        0.3,
        ge=0,
        lt=1,
        description="Shrink once the pool's busy share stayed below this for `shrink_after_steps` steps in a row.",
    )
    shrink_after_steps: int = Field(5, ge=1, description="Steps in a row below `busy_low` before a shrink.")
    window: int = Field(
        3,
        ge=1,
        description="Steps measured since the last change of any pool that a grow is decided on (their means); "
        "rows measured while a pool was being resized are not counted.",
    )
    cooldown_s: float = Field(
        30.0,
        ge=0,
        description="No second change of this pool within this many seconds; a change that reverses the last one "
        "(a shrink after a grow, a grow after a shrink) waits three times as long.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> PoolAutoscale:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.busy_low >= self.busy_high:
            raise ValueError(f"busy_low ({self.busy_low}) must be < busy_high ({self.busy_high})")
        return self


class GenerationAutoscale(PoolAutoscale):
    """The generation pool's settings: a pool's, and the staleness drops that say it is ahead."""

    shrink_stale_samples: float | None = Field(
        None,
        gt=0,
        description="Shrink generation when, over the window, this many samples or more per step were dropped as "
        "stale (`dropped_stale`: generated too far ahead of the learner) while the learner did not wait longer than "
        "`grow_wait_s`; generation never grows in a window with stale drops. None: stale drops only block a grow.",
    )


class AutoScaling(_Strict):
    """The pools the autoscaler may resize, by the names `rlhf-cluster scale --pool` takes."""

    generation: GenerationAutoscale = Field(default_factory=GenerationAutoscale, description="The generation pool.")
    reward: PoolAutoscale = Field(default_factory=PoolAutoscale, description="The reward pool.")
    reference: PoolAutoscale = Field(
        default_factory=PoolAutoscale,
        description="The reference pool, or with `algorithm.distillation` the teacher's pool in its place.",
    )
    judge: PoolAutoscale = Field(default_factory=PoolAutoscale, description="The judge pool (with a `judge` source).")

    def of(self, pool: str) -> PoolAutoscale:
        """The settings of a pool by its name in the job (`teacher` is `reference`'s)."""
        return getattr(self, "reference" if pool == "teacher" else pool)

    @property
    def active(self) -> bool:
        return any(self.of(pool).enabled for pool in ("generation", "reward", "reference", "judge"))


class ScalingConfig(_Strict):
    """Pool sizes while the job runs."""

    auto: AutoScaling = Field(
        default_factory=AutoScaling, description="The closed-loop autoscaler, per pool (every pool off by default)."
    )
    request_nodes: bool = Field(
        False,
        description="Where the Ray cluster runs Ray's autoscaler: a grow asks it for the new workers' resources "
        "(`ray.autoscaler.sdk.request_resources`) instead of being held to the resources free now.",
    )


def check_start_sizes(auto: AutoScaling, sizes: dict[str, tuple[str, int]]) -> None:
    """Refuse a pool whose starting size (`sizes`: pool -> (its replicas field, value)) lies outside
    the autoscaler's bounds for it, naming both fields."""
    for pool, (field, replicas) in sizes.items():
        bounds = auto.of(pool)
        if bounds.enabled and not bounds.min_replicas <= replicas <= bounds.max_replicas:
            raise ValueError(
                f"{field} ({replicas}) lies outside scaling.auto.{pool}'s bounds: min_replicas "
                f"{bounds.min_replicas}, max_replicas {bounds.max_replicas}"
            )
