"""Liveness: how a worker that is alive but stuck is told from one that is busy. Ray-free.

A worker answers heartbeats from its own concurrency group (or event loop), so a long request
does not delay them: a heartbeat unanswered within `faults.heartbeat_timeout_s` means the
process is stopped or wedged (SIGSTOP, a deadlock holding the GIL). A process that answers but
whose engine has had requests running without taking a step for `faults.stall_timeout_s`
reports how long in `stalled_s` (`StallClock`): its engine thread is hung. A job whose workers
all answer but whose learner gets no batch (every group dropped) is ended by `ProgressWatchdog`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


class StallClock:
    """Seconds an engine with work has gone without a step; 0 while it steps or is idle."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._busy_since_step: float | None = None  # when the last step left requests running

    def stepped(self, running: int) -> None:
        """After every engine step, with the requests still running."""
        self._busy_since_step = self._clock() if running > 0 else None

    def stalled_s(self) -> float:
        return 0.0 if self._busy_since_step is None else self._clock() - self._busy_since_step


@dataclass(frozen=True)
class Heartbeat:
    """What a watchdog learned from one heartbeat round to one worker."""

    answered: bool
    stalled_s: float = 0.0
    dead: bool = False  # its process is gone: whoever calls it next replaces it, as before heartbeats
    spans: list = field(default_factory=list)  # trace spans the worker recorded since the previous heartbeat

    def hung(self, stall_timeout_s: float) -> str | None:
        """Why the worker counts as hung, or None if it is alive (or dead, which is not hung)."""
        if self.dead:
            return None
        if not self.answered:
            return "no heartbeat answer"
        if self.stalled_s > stall_timeout_s:
            return f"its engine took no step for {self.stalled_s:.0f} s with requests running"
        return None


class HungWorkerError(RuntimeError):
    """A worker was declared hung and killed by the watchdog."""


class NoProgressError(RuntimeError):
    """The learner took no step within the no-progress watchdog's bound; the message says why."""


class ProgressWatchdog:
    """Tells a step loop that waits for its batch too long from one whose steps are merely slow.

    The wait for a step's batch is timed from the step loop's first look at the buffer that finds
    too little (`waiting`) to the look that finds a batch (`progressed`); evaluations and
    checkpoints between steps are not waits. The bound is derived from the observed step time
    (`progressed` to `progressed`, the wait included): `factor` x the slowest of the last
    `RECENT` steps, at least `FLOOR_S` (a worker restart or a slow prompt must not end a fast
    job), at most `ceiling_s`, which alone applies before the first step.
    """

    FLOOR_S = 600.0
    RECENT = 20

    def __init__(self, ceiling_s: float, factor: float = 10.0, clock=time.monotonic):
        if ceiling_s <= 0 or factor < 1:
            raise ValueError(f"ProgressWatchdog: expected ceiling_s > 0 and factor >= 1, got {ceiling_s} and {factor}")
        self.ceiling_s, self.factor, self._clock = ceiling_s, factor, clock
        self._waiting_since: float | None = None
        self._last_progress: float | None = None
        self._steps: deque[float] = deque(maxlen=self.RECENT)

    def waiting(self) -> None:
        """The step loop looked for its batch and found too little (the clock starts at the first look)."""
        if self._waiting_since is None:
            self._waiting_since = self._clock()

    def progressed(self) -> None:
        """The step loop found its batch: the wait ends, and the time since the last one is a step's."""
        now = self._clock()
        if self._last_progress is not None:
            self._steps.append(now - self._last_progress)
        self._last_progress, self._waiting_since = now, None

    def bound_s(self) -> float:
        if not self._steps:
            return self.ceiling_s
        return min(self.ceiling_s, max(self.FLOOR_S, self.factor * max(self._steps)))

    def overdue_s(self) -> float | None:
        """Seconds the step loop has waited, once that is past the bound (else None)."""
        if self._waiting_since is None:
            return None
        waited = self._clock() - self._waiting_since
        return waited if waited > self.bound_s() else None

    def poll_s(self) -> float:
        """How often a waiting step loop should look again even when nothing arrives."""
        return min(30.0, max(0.5, self.bound_s() / 20))

    def explain(self) -> str:
        """How the bound was derived, naming the setting that changes it."""
        if not self._steps:
            return f"the bound before the first step is faults.progress_timeout_s = {self.ceiling_s:g} s"
        return (
            f"the bound {self.bound_s():.0f} s is faults.progress_timeout_factor {self.factor:g} x the slowest of "
            f"the last {len(self._steps)} steps ({max(self._steps):.1f} s), at least {self.FLOOR_S:g} s and at most "
            f"faults.progress_timeout_s = {self.ceiling_s:g} s"
        )
