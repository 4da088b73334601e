"""The driver's side of a collective weight push (`WeightSync`) when a member fails (found by the
soak, issue 58): an engine that dies in the broadcast also fails the sender's side with
`DeliveryInterrupted`; that is the death's doing, so the push ends (the pool replaces the engine,
which joins with the newest delivery) instead of the job. A sender failure with no engine dead
still ends the job. The engines and the sender are fakes answering as Ray's handles would."""

from __future__ import annotations

import asyncio

import pytest
import ray

from actors.workers.weight_sync import WeightSync
from rlhf_cluster.weights.messages import Delivery, Receipt, VariantLink
from rlhf_cluster.weights.transports import DeliveryInterrupted


class _Call:
    def __init__(self, answer):
        self.answer = answer

    def remote(self, delivery):
        async def answered():
            if isinstance(self.answer, BaseException):
                raise self.answer
            return self.answer(delivery)

        return answered()


class _Engine:
    def __init__(self, name, dies=False):
        self.load = _Call(ray.exceptions.RayActorError() if dies else
                          (lambda d: Receipt.judged(name, d, "full", "loaded", "sender", fingerprint="fp")))


class _Pool:
    def __init__(self, engines):
        self.actors = {f"gen{i}": e for i, e in enumerate(engines)}
        self.draining = {}
        self.spares = {}


def _push(engines, sender_error):
    async def sender_side(delivery):
        raise sender_error

    sync = WeightSync(lambda receipts: None)
    sync.serve(_Pool(engines))
    delivery = Delivery("collective", 3, "t", {"full": VariantLink(fingerprint="fp")}, sender=True)
    sync.adopt(delivery, sender_side)  # the learner whose rank 0 takes part in the push
    return asyncio.run(sync.push(delivery))


def test_an_engine_dying_in_the_broadcast_ends_the_push_not_the_job():
    receipts = _push([_Engine("gen0"), _Engine("gen1", dies=True)], DeliveryInterrupted("connection reset by peer"))
    assert [(r.worker, r.status, r.proven) for r in receipts] == [("gen0", "loaded", True)]


def test_a_sender_failure_with_every_engine_alive_ends_the_job():
    with pytest.raises(DeliveryInterrupted, match="reset"):
        _push([_Engine("gen0"), _Engine("gen1")], DeliveryInterrupted("connection reset by peer"))
