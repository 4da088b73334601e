"""The closed-loop autoscaler: after each learner step, whether to grow or shrink one pool, from
the step's row (`learner_wait_seconds`, `busy_<pool>`, `dropped_stale`), within `scaling.auto`.

The rule (docs/operations.md, "Autoscaling"):

- grow: the learner waited for its batch longer than `grow_wait_s` and the pool's busy share
  was at least `busy_high` (both the mean of the last `window` steps): the buffer runs dry and
  this pool is the short one. Of the pools that qualify, the busiest grows (the bottleneck).
  Generation never grows in a window with stale drops (it already runs ahead of the learner).
- shrink: the pool's busy share stayed below `busy_low` for `shrink_after_steps` steps in a
  row; generation also shrinks when `shrink_stale_samples` or more samples a step were dropped
  as stale while the learner did not wait (too much generation).
- one worker at a time, at most one pool a round, never outside [min_replicas, max_replicas],
  never a pool changed within its `cooldown_s` (a change that reverses its last one, a shrink
  after a grow or a grow after a shrink, within `REVERSAL_COOLDOWNS` x `cooldown_s`) nor one
  pinned by a manual `scale`. After any change the window starts again: rows measured at the
  old sizes decide nothing more.

Pure and Ray-free: the driver's side (`actors/workers/autoscaling.py`) feeds it rows and applies
its decisions through the same resize as `rlhf-cluster scale`. `fits` and `resource_bundles`
keep a grow within what the cluster can place.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from statistics import fmean

from rlhf_cluster.config.scaling import AutoScaling, GenerationAutoscale, PoolAutoscale

# A pool's change against its last one (down after up, up after down) waits this many cooldowns:
# a load that comes and goes in bursts is followed at most once a burst, not up and down each.
REVERSAL_COOLDOWNS = 3


@dataclass(frozen=True)
class Decision:
    """Resize `pool` from `current` to `replicas` workers, and why (a sentence for events.jsonl)."""

    pool: str
    current: int
    replicas: int
    reason: str

    @property
    def direction(self) -> str:
        return "up" if self.replicas > self.current else "down"


@dataclass(frozen=True)
class StepSignal:
    """What one step's row says about the pools: the learner's wait for its batch, each pool's
    busy share, and the samples dropped as stale during the step."""

    wait_s: float
    busy: dict[str, float]
    stale: float


class Autoscaler:
    """Decides, step by step, which pool (if any) changes size. `observe` after each step; `pin`
    when an operator sizes a pool by hand (it is left alone), `release` to hand it back."""

    def __init__(self, auto: AutoScaling):
        self.auto = auto
        self.pinned: set[str] = set()
        self.rows: deque[StepSignal] = deque(maxlen=max(auto.of(p).window for p in _CONFIGURED))
        self.quiet: dict[str, int] = {}  # steps in a row each pool was below its busy_low
        self.changed_at: dict[str, float] = {}  # when each pool last changed (the clock `observe` is given)
        self.direction: dict[str, str] = {}  # each pool's last change: up or down
        self._stale_total: float | None = None  # the row's cumulative `dropped_stale`, last seen

    def pin(self, pool: str) -> None:
        self.pinned.add(pool)

    def release(self, pool: str) -> None:
        """Hand a pinned pool back; it is judged on steps measured from now on."""
        self.pinned.discard(pool)
        self.restart_window()

    def applied(self, pool: str, now: float) -> None:
        """A decision's resize ended (applied, refused or skipped) at `now`: its pool's cooldown
        runs from here, and rows measured while it ran decide nothing."""
        self.changed_at[pool] = now
        self.restart_window()

    def restart_window(self) -> None:
        """Forget the rows seen so far (the sizes they were measured at changed)."""
        self.rows.clear()
        self.quiet.clear()

    def observe(
        self,
        row: Mapping[str, float],
        sizes: Mapping[str, int],
        now: float,
        fits: Callable[[Decision], bool] = lambda decision: True,
    ) -> list[Decision]:
        """Take one step's row (`sizes`: every pool's workers now; `now`: seconds on a monotonic
        clock) and return the change to make: at most one, the first candidate that `fits`."""
        signal = self._signal(row, sizes)
        self.rows.append(signal)
        for pool, share in signal.busy.items():
            self.quiet[pool] = self.quiet.get(pool, 0) + 1 if share < self.auto.of(pool).busy_low else 0
        for decision in self._grows(sizes, now) + self._shrinks(sizes, now):
            if fits(decision):
                self.changed_at[decision.pool] = now
                self.direction[decision.pool] = decision.direction
                self.restart_window()
                return [decision]
        return []

    def _signal(self, row: Mapping[str, float], sizes: Mapping[str, int]) -> StepSignal:
        total = float(row.get("dropped_stale", 0.0))
        stale = 0.0 if self._stale_total is None else max(0.0, total - self._stale_total)
        self._stale_total = total
        busy = {pool: float(row.get(f"busy_{pool}", 0.0)) for pool in sizes}
        return StepSignal(float(row.get("learner_wait_seconds", 0.0)), busy, stale)

    def _free(self, pool: str, now: float, direction: str) -> PoolAutoscale | None:
        """The pool's settings if the autoscaler may change it now in `direction` (on, not
        pinned, cooled down: longer for a change that reverses the last one)."""
        bounds = self.auto.of(pool)
        if not bounds.enabled or pool in self.pinned:
            return None
        reverses = self.direction.get(pool, direction) != direction
        cooldown = bounds.cooldown_s * (REVERSAL_COOLDOWNS if reverses else 1)
        if pool in self.changed_at and now - self.changed_at[pool] < cooldown:
            return None
        return bounds

    def _window(self, n: int) -> list[StepSignal] | None:
        return list(self.rows)[-n:] if len(self.rows) >= n else None

    def _grows(self, sizes: Mapping[str, int], now: float) -> list[Decision]:
        """Pools that are short while the learner waits, busiest first."""
        found: list[tuple[float, Decision]] = []
        for pool, size in sizes.items():
            bounds = self._free(pool, now, "up")
            rows = self._window(bounds.window) if bounds is not None else None
            if bounds is None or rows is None or size + 1 > bounds.max_replicas:
                continue
            wait, busy = fmean(r.wait_s for r in rows), fmean(r.busy.get(pool, 0.0) for r in rows)
            if wait <= bounds.grow_wait_s or busy < bounds.busy_high:
                continue
            if isinstance(bounds, GenerationAutoscale) and any(r.stale for r in rows):
                continue  # generation already runs ahead of the learner: more would be dropped
            reason = (
                f"the learner waited {wait:.2f} s a step (> {bounds.grow_wait_s:g}) while {pool} was busy "
                f"{busy:.2f} of the time (>= {bounds.busy_high:g}), over {len(rows)} steps"
            )
            found.append((busy, Decision(pool, size, size + 1, reason)))
        return [decision for _, decision in sorted(found, key=lambda item: -item[0])]

    def _shrinks(self, sizes: Mapping[str, int], now: float) -> list[Decision]:
        """Pools idle for long enough (or generation running too far ahead), idlest first."""
        found: list[tuple[float, Decision]] = []
        for pool, size in sizes.items():
            bounds = self._free(pool, now, "down")
            if bounds is None or size - 1 < bounds.min_replicas:
                continue
            busy = fmean(r.busy.get(pool, 0.0) for r in self.rows)
            reason = self._stale_reason(bounds)
            if self.quiet.get(pool, 0) >= bounds.shrink_after_steps:
                reason = (
                    f"{pool} was busy less than {bounds.busy_low:g} of the time for {self.quiet[pool]} steps "
                    f"in a row (mean {busy:.2f})"
                )
            if reason is not None:
                found.append((busy, Decision(pool, size, size - 1, reason)))
        return [decision for _, decision in sorted(found, key=lambda item: item[0])]

    def _stale_reason(self, bounds: PoolAutoscale) -> str | None:
        """Why generation should shrink for its stale drops, or None."""
        if not isinstance(bounds, GenerationAutoscale) or bounds.shrink_stale_samples is None:
            return None
        rows = self._window(bounds.window)
        if rows is None:
            return None
        stale, wait = fmean(r.stale for r in rows), fmean(r.wait_s for r in rows)
        if stale < bounds.shrink_stale_samples or wait > bounds.grow_wait_s:
            return None
        return (
            f"{stale:.1f} samples a step were dropped as stale (>= {bounds.shrink_stale_samples:g}) while the "
            f"learner waited {wait:.2f} s a step, over {len(rows)} steps: generation runs too far ahead"
        )


_CONFIGURED = ("generation", "reward", "reference", "judge")


def fits(decision: Decision, free: Mapping[str, float], per_actor: Mapping[str, float]) -> bool:
    """Whether the workers `decision` adds fit in the resources `free` now (a shrink always does).
    `per_actor`: what one worker of the pool asks (`placement.resource_plan`)."""
    added = decision.replicas - decision.current
    return added <= 0 or all(free.get(name, 0.0) + 1e-9 >= added * amount for name, amount in per_actor.items())


def resource_bundles(sizes: Mapping[str, int], per_actor: Mapping[str, Mapping[str, float]]) -> list[dict[str, float]]:
    """One bundle per worker of every pool at `sizes`: what Ray's autoscaler is asked to hold
    (`request_resources` takes the whole demand, not an increment). Workers that ask nothing are left out."""
    return [dict(per_actor[pool]) for pool, n in sizes.items() for _ in range(n) if per_actor.get(pool)]
