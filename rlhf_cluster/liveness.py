"""Liveness: how a worker that is alive but stuck is told from one that is busy. Ray-free.

A worker answers heartbeats from its own concurrency group (or event loop), so a long request
does not delay them: a heartbeat unanswered within `faults.heartbeat_timeout_s` means the
process is stopped or wedged (SIGSTOP, a deadlock holding the GIL). A process that answers but
whose engine has had requests running without taking a step for `faults.stall_timeout_s`
reports how long in `stalled_s` (`StallClock`): its engine thread is hung.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


class StallClock:
    """Seconds an engine with work has gone without a step; 0 while it steps or is idle."""

    def __init__(self, clock=time.monotonic):
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
