"""The service's futures: every training and sampling call answers at once with a request id, and
the SDK fetches the result with `retrieve_future`.

The SDK polls again at once after a "try again", so a retrieve waits (long-polls) for the result up
to `long_poll_s` before answering it. Request ids are made from the model (or sampler) and the
SDK's own sequence number, so a call sent again (after a lost answer, or after a 410 from a
restarted server) finds its first future instead of running twice. A finished future is kept
`ttl_s` after it finished, then dropped; an id the table does not know is answered 410, which makes
the SDK send its call again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum


class Category(StrEnum):
    """Whose fault a failed future is, as the SDK's `RequestErrorCategory` names it."""

    USER = "user"
    SERVER = "server"


class UserError(Exception):
    """A request the service cannot run as asked (its future fails with category `user`)."""


@dataclass
class Outcome:
    """A finished future: a JSON body, protobuf bytes (the two kinds the SDK reads as protobuf), or
    an error with its category."""

    body: dict | bytes | None = None
    error: str | None = None
    category: Category = Category.SERVER

    @property
    def failed(self) -> bool:
        return self.error is not None


@dataclass
class _Entry:
    kind: str
    created: float
    done: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: Outcome | None = None
    finished: float = 0.0


class TryAgain:
    """Not finished within the long poll."""


class FutureTable:
    """Futures by request id, on one event loop. `on_change(kind, delta)` is told when a future of
    `kind` starts (+1) or finishes (-1), for the in-flight gauge."""

    def __init__(self, ttl_s: float, on_change: Callable[[str, int], None] = lambda kind, delta: None):
        self.ttl_s, self.on_change = ttl_s, on_change
        self._entries: dict[str, _Entry] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._entries

    def in_flight(self) -> int:
        return sum(1 for e in self._entries.values() if e.outcome is None)

    def start(self, request_id: str, kind: str) -> bool:
        """Register a future; False when one with this id exists already (a call sent twice: the
        caller does not run it again)."""
        self._expire()
        if request_id in self._entries:
            return False
        self._entries[request_id] = _Entry(kind, time.monotonic())
        self.on_change(kind, 1)
        return True

    def finish(self, request_id: str, outcome: Outcome) -> None:
        entry = self._entries.get(request_id)
        if entry is None or entry.outcome is not None:
            return
        entry.outcome, entry.finished = outcome, time.monotonic()
        entry.done.set()
        self.on_change(entry.kind, -1)

    async def wait(self, request_id: str, timeout: float) -> Outcome | TryAgain | None:
        """The outcome, `TryAgain` when it is not there within `timeout`, or None for an id the
        table does not know (never started, or dropped after its TTL)."""
        entry = self._entries.get(request_id)
        if entry is None:
            return None
        try:
            async with asyncio.timeout(timeout):
                await entry.done.wait()
        except TimeoutError:
            return TryAgain()
        return entry.outcome

    def cancel(self, request_id: str) -> None:
        self.finish(request_id, Outcome(error="cancelled by the client", category=Category.USER))

    def _expire(self) -> None:
        now = time.monotonic()
        gone = [rid for rid, e in self._entries.items() if e.outcome is not None and now - e.finished > self.ttl_s]
        for rid in gone:
            del self._entries[rid]
