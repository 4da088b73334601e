"""Preemption and Ctrl-C: SIGTERM (what Kubernetes and Slurm send before they kill) and SIGINT
stop a job the way `Job.stop` does, so no trained step is lost and the job continues with
`--resume auto`; `StopRequest` is that stop as the job's loops see it."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import FrameType

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    """While active (a context manager, in the main thread), the first SIGTERM or SIGINT asks the
    attached job to stop after the step in progress, with a checkpoint of the last trained step.
    If the job has not ended `grace_s` seconds later, or a second signal arrives, or no job is
    attached yet (still starting: nothing trained to keep), the main thread gets
    `KeyboardInterrupt` and the job is torn down without that checkpoint. `received` names the
    signal that asked for the stop (None: none did)."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.received: str | None = None
        self._job = None
        self._timer: threading.Timer | None = None
        # what `signal.signal` returns: the handler each signal had before
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | signal.Handlers | None] = {}
        self._expired = False

    def attach(self, job) -> None:
        """The job a signal stops (anything with `stop()`)."""
        self._job = job

    def __enter__(self) -> GracefulStop:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self._expired:
            raise KeyboardInterrupt(f"the job did not stop within {self.grace_s:g} s of {self.received}")
        if self.received is not None or self._job is None:
            raise KeyboardInterrupt(f"{name}: stopping at once")
        self.received = name
        log.info(
            f"{name}: stopping after the step in progress and writing a checkpoint "
            f"(within {self.grace_s:g} s; a second signal stops at once)"
        )
        self._job.stop()
        self._timer = threading.Timer(self.grace_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        # A real signal, not `_thread.interrupt_main`: it also wakes a main thread blocked in a
        # system call (the event loop's select), so the interrupt lands now, not at its next wake-up.
        self._expired = True
        os.kill(os.getpid(), signal.SIGINT)


class StopRequest:
    """A job's request to stop after the step in progress: made from any thread or a signal
    handler (`request`), read by the job's loops (`requested`), and waking them on the event loop
    they run on (`bind`: the loop and a coroutine function that wakes its waiters)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: Callable[[], Coroutine[Any, Any, None]] | None = None

    def bind(self, loop: asyncio.AbstractEventLoop, wake: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._loop, self._wake = loop, wake

    def request(self) -> None:
        self._event.set()
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            loop.call_soon_threadsafe(lambda: loop.create_task(wake()))

    @property
    def requested(self) -> bool:
        return self._event.is_set()
