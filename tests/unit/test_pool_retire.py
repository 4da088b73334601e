"""A retiring worker is out of rotation but still reachable while its requests finish (the
scale-down race `test_scaling` met: a request held for a version the worker was no longer sent)."""

from __future__ import annotations

import asyncio

from actors.workers import pools
from actors.workers.pools import ActorPool
from tests.fakes import RemoteMethod


class _FakeActor:
    """Stands in for a Ray actor handle: `generate.remote()` waits until `release` is set."""

    def __init__(self):
        self.release = asyncio.Event()
        self.generate = RemoteMethod(self._generate)

    async def _generate(self):
        await self.release.wait()
        return "done"


def test_a_retiring_worker_is_draining_until_its_requests_finish(monkeypatch):
    killed = []
    monkeypatch.setattr(pools.ray, "kill", lambda actor, no_restart: killed.append(actor))

    async def scenario():
        pool = ActorPool("generation", "gen", lambda index, slot: _FakeActor())
        pool.start(2)
        gen1 = pool.actors["gen1"]
        pool._turn = 1  # the next call goes to gen1
        request = asyncio.create_task(pool.call("generate"))
        await asyncio.sleep(0)
        retiring = asyncio.create_task(pool.retire(1))
        await asyncio.sleep(0.05)
        # Out of rotation, not yet killed, and listed for the pushes its request may be waiting for.
        assert list(pool.actors) == ["gen0"] and pool.draining == {"gen1": gen1} and not killed
        assert not retiring.done()
        gen1.release.set()
        assert await request == ("gen1", "done")
        assert await retiring == ["gen1"]
        assert pool.draining == {} and killed == [gen1]

    asyncio.run(scenario())
