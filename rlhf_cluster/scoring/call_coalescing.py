"""Joining concurrent small calls into one: the scoring calls of many prompt groups.

In streaming mode every prompt group is its own generation request, and a batch's groups tend to
finish at the same engine step. Scored one call per group, a tiny model's reference pays its
fixed cost (a Ray round trip, a forward's Python overhead) once per group, one after another, on
the step's critical path. A `CallCoalescer` sends a call at once while the pool has a free
worker, and otherwise holds it: every call that arrives while the workers are busy leaves
together, as one call, when the next worker frees up. Idle scoring adds no delay; busy scoring
gets batches as large as the backlog, up to `max_items` (a step's samples: one step's batch is
never held back by the next step's groups joined to it) and up to the backlog's share per free
worker (the waiting items over the workers free now, rounded up): a backlog spreads over every
free worker, rather than all of it going to one while the others idle (a pool grown for a slow
reward would otherwise score a step's groups on one worker).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class CallCoalescer(Generic[Item, Result]):
    """Sends lists of items through `send` (one list in, one result per item out, in order), with at
    most `capacity()` sends in flight; lists that wait for a free slot are joined into one send.

    A send takes the waiting calls in arrival order up to `max_items` items and up to its share of
    the backlog, `ceil(waiting items / free slots)` (at least one call, however large).
    `capacity` is read at each dispatch, so a pool that grows or shrinks is followed. If a send
    raises, every call joined into it raises the same exception.
    """

    def __init__(
        self,
        send: Callable[[list[Item]], Awaitable[Sequence[Result]]],
        capacity: Callable[[], int],
        max_items: int | None = None,
    ):
        self._send = send
        self._capacity = capacity
        self._max_items = max_items
        self._waiting: list[tuple[list[Item], asyncio.Future]] = []
        self._in_flight = 0
        self._scheduled = False
        self._sends: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks
        # The pool's queue: items waiting for a free worker, integrated over time (item-seconds).
        self._queued, self._queued_since, self._item_seconds = 0, time.monotonic(), 0.0

    def waited_item_seconds(self) -> float:
        """Items waiting for a free worker, integrated over time since the coalescer began: its
        growth over an interval, divided by the interval, is the pool's mean queue depth then."""
        self._count_queue(0)
        return self._item_seconds

    def _count_queue(self, change: int) -> None:
        now = time.monotonic()
        self._item_seconds += self._queued * (now - self._queued_since)
        self._queued, self._queued_since = self._queued + change, now

    async def __call__(self, items: Sequence[Item]) -> list[Result]:
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiting.append((list(items), future))
        self._count_queue(len(items))
        self._schedule()
        return await future

    def _schedule(self) -> None:
        # Dispatch after the callbacks already queued on the loop: calls that become ready in the
        # same loop iteration (groups finishing at one engine step) leave together.
        if not self._scheduled and self._waiting and self._in_flight < max(1, self._capacity()):
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._scheduled = False
        # A caller cancelled while waiting (a rollout a rollback abandoned) sends nothing.
        self._count_queue(-sum(len(items) for items, f in self._waiting if f.done()))
        self._waiting = [(items, f) for items, f in self._waiting if not f.done()]
        workers = max(1, self._capacity())
        free = max(1, workers - self._in_flight)
        share = -(-sum(len(items) for items, _ in self._waiting) // free)
        most = share if self._max_items is None else min(share, self._max_items)
        while self._waiting and self._in_flight < workers:
            taken, size = 0, 0
            while taken < len(self._waiting) and (taken == 0 or size + len(self._waiting[taken][0]) <= most):
                size += len(self._waiting[taken][0])
                taken += 1
            joined, self._waiting = self._waiting[:taken], self._waiting[taken:]
            self._count_queue(-size)
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._run(joined))
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)

    async def _run(self, joined: list[tuple[list[Item], asyncio.Future]]) -> None:
        try:
            results = list(await self._send([item for items, _ in joined for item in items]))
            expected = sum(len(items) for items, _ in joined)
            if len(results) != expected:
                raise RuntimeError(f"coalesced call returned {len(results)} results for {expected} items")
        except BaseException as exc:  # noqa: BLE001 - handed to every caller joined into this send
            cancelled = isinstance(exc, asyncio.CancelledError)
            for _, future in joined:
                if not future.done():
                    future.cancel() if cancelled else future.set_exception(exc)
            if cancelled:
                raise
            return
        finally:
            self._in_flight -= 1
            self._schedule()  # the rest of the backlog, if any
        start = 0
        for items, future in joined:
            if not future.done():  # a caller cancelled meanwhile
                future.set_result(results[start : start + len(items)])
            start += len(items)
