"""WeightSync: how a published version reaches every generation engine, on the driver's side.

    adopt(delivery, sender)  a learner (the job's first, or a rebuilt one): the version it
                             restored and its rank 0's part of every push
    first()                  the adopted version, to the engines started from the model folder (blocking)
    restore()                the adopted version, to every engine after a rebuild (a rollback's push)
    push(delivery)           every engine of the pool (spares, joining and retiring ones too) loads it now
    join(worker)             a new worker loads the newest version before it serves

It owns the current learner's sender and start delivery, the newest delivery, the workers
joining, the push lock (versions reach every engine in order), the seating of a push's broadcast
group for a transport whose sender takes part (`Delivery.sender`: the learner's rank 0 and the
push's engines form a numbered group, numbered anew whenever that set changes or a push was
interrupted), the receipts, and the probe reports riding on them (all handed to `on_receipts`).
An interrupted push (a member died or hung; each engine answers `interrupted` within the
transport's timeout) goes out again to the engines it interrupted, seated anew, at most
`ATTEMPTS` times. Each receipt comes judged by its engine (`Receipt.judged`: proven or not, and
by whom); this side records them.

A worker that dies meanwhile is its pool's business (it is replaced and its replacement joins);
any other failure ends the job.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Sequence
from typing import Any

import ray

from rlhf_cluster.weights.messages import Delivery, Receipt, Seat
from rlhf_cluster.weights.transports import DeliveryInterrupted

log = logging.getLogger(__name__)

ATTEMPTS = 3
DELIVERY_TIMEOUT_S = 600.0  # the first delivery, blocking: engines load the job's version before anything runs
RECEIPTS_KEPT = 10_000


class WeightSync:
    """One job's weight pushes. `on_receipts`: where every load's receipt goes (each proven or
    not, with the probe report riding on it). The learner whose versions it pushes is set by
    `adopt`, the generation pool it serves by `serve` (the pool's workers `join` through it)."""

    def __init__(self, on_receipts: Callable[[list[Receipt]], None]):
        self.on_receipts = on_receipts
        # The current learner's rank 0 part of a push (its `send`), and the version it restored,
        # until `first` or `restore` pushes it (`adopt`).
        self.sender: Callable[[Delivery], ray.ObjectRef] | None = None
        self.adopted: Delivery | None = None
        self.delivery: Delivery | None = None  # the newest version's, for every worker that joins
        self.pool: Any = None  # the generation ActorPool (`serve`)
        # Workers being prepared; pushes reach them too. (Actor handles hash and compare by actor id.)
        self._joining: set = set()
        self._pushing = asyncio.Lock()
        self._seating: tuple[tuple, int] | None = None  # the engines of the last group and its number
        self._groups = 0
        self.receipts: collections.deque[Receipt] = collections.deque(maxlen=RECEIPTS_KEPT)

    def serve(self, pool: Any) -> None:
        self.pool = pool

    def adopt(self, delivery: Delivery, sender: Callable[[Delivery], ray.ObjectRef]) -> None:
        """A learner becomes the job's: `delivery` is the version it restored (pushed next, by
        `first` or `restore`), `sender` its rank 0's part of a push (used where the delivery's
        transport has the sender take part)."""
        self.adopted, self.sender = delivery, sender

    def _take_adopted(self) -> Delivery:
        """The adopted version, once: afterwards it is the newest delivery, and nothing else here
        pins its buckets."""
        if self.adopted is None:
            raise RuntimeError("no learner's start is adopted: nothing to push")
        delivery, self.adopted = self.adopted, None
        return delivery

    def first(self) -> list[Receipt]:
        """Blocking: the engines started from the model folder load the adopted learner's
        version (the job's) before anything is generated."""
        self.delivery = delivery = self._take_adopted()
        engines = [*self.pool.actors.values(), *self.pool.spares.values()]
        if not delivery.sender:
            receipts = ray.get([e.load.remote(delivery) for e in engines], timeout=DELIVERY_TIMEOUT_S)
        else:
            _, *receipts = ray.get(self._seated(delivery, engines), timeout=DELIVERY_TIMEOUT_S)
            if any(r.status == "interrupted" for r in receipts):
                raise RuntimeError(f"the first delivery of version {delivery.version} was interrupted: {receipts}")
        return self._record(receipts)

    async def restore(self) -> list[Receipt]:
        """Every engine holds the rebuilt learner's restored version before new groups start (a
        rollback's push: it goes out even when an engine holds a newer number)."""
        return await self.push(self._take_adopted(), rollback=True)

    async def join(self, worker) -> None:
        """A new generation worker loads the newest weights before it serves anything: the newest
        version in the store, then the newest delivery (not loaded again when it is the same
        bytes). While it joins, pushes include it, and it takes any it missed meanwhile."""
        self._joining.add(worker)
        self._record([await worker.load_stored.remote(0)])
        async with self._pushing:  # then the newest delivery, unless a push brought it meanwhile
            delivery = self.delivery
            if delivery is None:
                return
            (receipt,) = await self._push(delivery, [worker])
            if isinstance(receipt, ray.exceptions.ObjectLostError):
                return  # its learner rank died; the rollback's push reaches this worker too
            if isinstance(receipt, BaseException):
                raise receipt
            self._record([receipt])

    async def push(self, delivery: Delivery, rollback: bool = False) -> list[Receipt]:
        """Every generation worker loads `delivery` now, with its requests in flight (skipped if a
        newer one was pushed, unless it is a `rollback`'s). Returns the receipts (the job's last
        version is never generated with, so its probe reports must not wait for a generate result)."""
        async with self._pushing:
            if self.delivery is not None and delivery.version <= self.delivery.version and not rollback:
                return []
            self.delivery = delivery
            # The spares too: each stands ready with the newest version.
            actors = [*self.pool.actors.values(), *self.pool.spares.values()]
            self._joining -= set(actors)  # joined: in the pool now
            # Retiring workers too: a request of theirs may be waiting for this version (without
            # it, the retirement waited for that request, and the request for the version).
            actors += list(self._joining) + list(self.pool.draining.values())
            results = await self._push(delivery, actors)
        for actor, result in zip(actors, results):
            if isinstance(result, ray.exceptions.RayActorError):
                self._joining.discard(actor)  # dead: the pool replaces it
            elif isinstance(result, ray.exceptions.ObjectLostError):
                pass  # the learner rank that owned the buckets died: its rollback pushes the restored version
            elif isinstance(result, BaseException):
                raise result
        return self._record([r for r in results if isinstance(r, Receipt)])

    async def _push(self, delivery: Delivery, engines: list) -> list:
        """Every engine of `engines` loads `delivery`; their receipts (or exceptions) in order."""
        if not delivery.sender:
            return await _gathered([e.load.remote(delivery) for e in engines])
        results: list = [None] * len(engines)
        pending = list(range(len(engines)))
        for attempt in range(1, ATTEMPTS + 1):
            sent, *got = await _gathered(self._seated(delivery, [engines[i] for i in pending]))
            for i, result in zip(pending, got):
                results[i] = result
            if isinstance(sent, ray.exceptions.RayActorError):
                return results  # the learner died: its rollback pushes the restored version
            # An engine that died in the broadcast fails the sender's side too: that failure is the
            # death's (the pool replaces the engine, which joins with the newest delivery).
            died = any(isinstance(results[i], ray.exceptions.RayActorError) for i in pending)
            pending = [i for i in pending if isinstance(results[i], Receipt) and results[i].status == "interrupted"]
            if not pending:
                if isinstance(sent, BaseException) and not (died and isinstance(sent, DeliveryInterrupted)):
                    raise sent
                return results
            self._seating = None  # a new group, even for the same engines
            log.warning(f"push of version {delivery.version} interrupted (attempt {attempt}): sending again")
        return results

    def _seated(self, delivery: Delivery, engines: list) -> list[ray.ObjectRef]:
        """Rank 0's send and each engine's load of `delivery`, every one with its seat."""
        if self._seating is None or self._seating[0] != tuple(engines):
            self._groups += 1
            self._seating = (tuple(engines), self._groups)
        size, group = len(engines) + 1, self._seating[1]
        if self.sender is None:
            raise RuntimeError(f"version {delivery.version}'s push needs its sender, and no learner is adopted")
        return [
            self.sender(delivery.seated(Seat(group, 0, size))),
            *(e.load.remote(delivery.seated(Seat(group, r, size))) for r, e in enumerate(engines, 1)),
        ]

    def _record(self, receipts: Sequence[Receipt]) -> list[Receipt]:
        """Keep the engines' receipts (judged by each engine: an unproven load was counted and
        logged there) in `receipts` and hand them to `on_receipts`."""
        recorded = list(receipts)
        self.receipts.extend(recorded)
        if recorded:
            self.on_receipts(recorded)
        return recorded


async def _gathered(refs: list) -> list:
    return await asyncio.gather(*refs, return_exceptions=True)
