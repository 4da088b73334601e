"""One delivery pushed to a set of generation engines, with the learner's rank 0 seated beside
them when the delivery's transport needs its sender at push time (`"sender": True`).

The engines of one push and rank 0 form a numbered group (`seat`: group, rank, size): the number
changes whenever the set of engines does, or after a push was interrupted, so every member builds
the new group on first use. An interrupted push (a member died or hung; each engine answers with
an `interrupted` receipt within the transport's timeout) goes out again to the engines it
interrupted, seated anew, at most `ATTEMPTS` times.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import ray

log = logging.getLogger(__name__)

ATTEMPTS = 3


class WeightPusher:
    """Seats every push's engines (and `sender`, rank 0's part of a push) and sends them the
    delivery; `push` for the job's event loop, `push_now` for its start."""

    def __init__(self, sender: Callable[[dict], ray.ObjectRef] | None = None):
        self.sender = sender  # set by the driver: the current learner's rank 0 `send`
        self._seating: tuple[tuple, int] | None = None  # the engines of the last group and its number
        self._groups = 0

    async def push(self, delivery: dict, engines: list) -> list:
        """Every engine receives `delivery`; their receipts (or exceptions) in order."""
        if not delivery.get("sender"):
            return await _gathered([e.receive.remote(delivery) for e in engines])
        results: list = [None] * len(engines)
        pending = list(range(len(engines)))
        for attempt in range(1, ATTEMPTS + 1):
            refs = self._seated(delivery, [engines[i] for i in pending])
            sent, *got = await _gathered(refs)
            for i, result in zip(pending, got):
                results[i] = result
            if isinstance(sent, ray.exceptions.RayActorError):
                return results  # the learner died: its rollback pushes the restored version
            pending = [i for i in pending if _interrupted(results[i])]
            if not pending:
                if isinstance(sent, BaseException):
                    raise sent
                return results
            self._seating = None  # a new group, even for the same engines
            log.warning(f"push of version {delivery['version']} interrupted (attempt {attempt}): sending again")
        return results

    def push_now(self, delivery: dict, engines: list, timeout_s: float) -> list:
        """Blocking: every engine receives `delivery` (the job's start); their receipts."""
        if not delivery.get("sender"):
            return ray.get([e.receive.remote(delivery) for e in engines], timeout=timeout_s)
        _, *receipts = ray.get(self._seated(delivery, engines), timeout=timeout_s)
        if any(_interrupted(r) for r in receipts):
            raise RuntimeError(f"the first delivery of version {delivery['version']} was interrupted: {receipts}")
        return receipts

    def _seated(self, delivery: dict, engines: list) -> list[ray.ObjectRef]:
        """Rank 0's send and each engine's receive of `delivery`, every one with its seat."""
        if self._seating is None or self._seating[0] != tuple(engines):
            self._groups += 1
            self._seating = (tuple(engines), self._groups)
        size, group = len(engines) + 1, self._seating[1]

        def seated(rank: int) -> dict:
            return {**delivery, "seat": {"group": group, "rank": rank, "size": size}}

        if self.sender is None:
            raise RuntimeError(f"version {delivery['version']}'s transport needs its sender, and none is set")
        return [self.sender(seated(0)), *(e.receive.remote(seated(r)) for r, e in enumerate(engines, 1))]


async def _gathered(refs: list) -> list:
    return await asyncio.gather(*refs, return_exceptions=True)


def _interrupted(result) -> bool:
    return isinstance(result, dict) and "interrupted" in result
