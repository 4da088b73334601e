"""Warm spares of an `ActorPool` (`generation.spares`): started and prepared with the others, out of
rotation; a worker that dies is replaced by a spare of its kind at once (no start, no back-off in
the way), a grow takes spares first, and every spare taken or lost is made again behind, in the
background. Fake actor handles: the pool's bookkeeping, not Ray's."""

from __future__ import annotations

import asyncio

import pytest
import ray

from actors.workers import pools
from actors.workers.pools import ActorPool
from rlhf_cluster.config import FaultsConfig
from tests.fakes import RemoteMethod


class _FakeActor:
    """A Ray actor handle's stand-in: `generate` answers its name, or raises as a dead actor does."""

    def __init__(self, name: str):
        self.name, self.dead = name, False
        self.generate = RemoteMethod(self._generate)
        self.heartbeat = RemoteMethod(self._heartbeat)

    async def _generate(self):
        if self.dead:
            raise ray.exceptions.RayActorError()
        return self.name

    async def _heartbeat(self):
        if self.dead:
            raise ray.exceptions.RayActorError()
        return {"stalled_s": 0.0}


def _pool(monkeypatch, spares=1, kind_of=lambda slot: None, prepare_fails=False, max_restarts=3, **kw):
    monkeypatch.setattr(pools.ray, "kill", lambda actor, no_restart: None)
    made, prepared, restarts, changes = [], [], [], []

    def factory(index, slot):
        made.append((index, slot))
        return _FakeActor(f"gen{index}")

    async def prepare(actor):
        if prepare_fails:
            raise RuntimeError("could not load the weights")
        prepared.append(actor.name)

    async def on_spares(lost):
        changes.append(lost)  # None: a spare made; a name: that spare lost

    pool = ActorPool(
        "generation", "gen", factory, prepare=prepare, max_restarts=max_restarts, backoff_s=30.0,
        on_restart=lambda dead, new, spare: restarts.append((dead, new, spare)),
        spares=spares, kind_of=kind_of, on_spares=on_spares, **kw,
    )  # fmt: skip
    return pool, made, prepared, restarts, changes


async def _settled(pool: ActorPool) -> None:
    """Wait for the spares being made behind."""
    await asyncio.gather(*pool._refills)
    pool._check_refills()


def test_spares_start_with_the_pool_out_of_rotation(monkeypatch):
    pool, made, *_ = _pool(monkeypatch, spares=2)
    created = pool.start(1)
    assert list(created) == ["gen0", "gen1", "gen2"] and list(pool.actors) == ["gen0"]
    assert list(pool.spares) == ["gen1", "gen2"] and len(pool) == 1

    async def calls():
        return {(await pool.call("generate"))[0] for _ in range(5)}

    assert asyncio.run(calls()) == {"gen0"}  # a spare is never sampled from


def test_a_dead_worker_is_replaced_by_the_spare_at_once_and_a_spare_is_made_behind(monkeypatch):
    pool, made, prepared, restarts, changes = _pool(monkeypatch)

    async def scenario():
        pool.start(1)
        pool.actors["gen0"].dead = True
        # backoff_s is 30 s: a replacement that started a new worker would wait for it.
        name, answer = await asyncio.wait_for(pool.call("generate"), 5)
        assert (name, answer) == ("gen1", "gen1")
        assert restarts == [("gen0", "gen1", True)] and list(pool.actors) == ["gen1"]
        assert pool.slot_of["gen1"] == 0  # it stands in gen0's slot
        await _settled(pool)
        assert list(pool.spares) == ["gen2"] and prepared == ["gen2"] and changes == [None]
        assert pool.restarts == 1

    asyncio.run(scenario())


def test_a_spare_stands_in_only_for_a_worker_of_its_kind(monkeypatch):
    # Slot 0 loads int8 weights, slot 1 full ones: the spare (slot 1) cannot stand in for gen0.
    pool, made, prepared, restarts, _ = _pool(monkeypatch, kind_of=lambda slot: "int8" if slot % 2 == 0 else "full")
    pool.backoff_s = 0.0

    async def scenario():
        pool.start(1)
        pool.actors["gen0"].dead = True
        assert (await pool.call("generate"))[0] == "gen2"
        assert restarts == [("gen0", "gen2", False)] and list(pool.spares) == ["gen1"]
        assert made[-1] == (2, 0) and prepared == ["gen2"]

    asyncio.run(scenario())


def test_a_grow_takes_the_spares_first(monkeypatch):
    pool, made, prepared, _, _ = _pool(monkeypatch)

    async def scenario():
        pool.start(1)
        assert await pool.resize(3) == ["gen1", "gen2"]  # the spare, then one new worker
        assert prepared[0] == "gen2"  # the new worker was prepared; the spare already was
        await _settled(pool)
        assert list(pool.actors) == ["gen0", "gen1", "gen2"] and list(pool.spares) == ["gen3"]

    asyncio.run(scenario())


def test_a_dead_spare_found_by_its_heartbeat_is_made_again(monkeypatch):
    pool, made, prepared, restarts, changes = _pool(monkeypatch)
    faults = FaultsConfig(heartbeat_interval_s=0.01, heartbeat_timeout_s=1.0)

    async def scenario():
        pool.start(1)
        pool.spares["gen1"].dead = True
        watch = asyncio.create_task(pool.watch(faults, on_hung=lambda *a: None))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if "gen2" in pool.spares:
                break
        watch.cancel()
        assert list(pool.spares) == ["gen2"] and list(pool.actors) == ["gen0"]
        assert pool.restarts == 1 and restarts == []  # no worker in rotation was replaced
        assert changes == ["gen1", None]  # lost, then made again

    asyncio.run(scenario())


@pytest.mark.parametrize("spares", [0, 1])
def test_a_dead_worker_without_restarts_left_ends_the_call_with_its_cause(monkeypatch, spares):
    """No restart left: the caller gets the pool's error (the job's end) with the actor's death as its
    cause, and neither a spare nor a new worker is taken for it."""
    pool, made, _, restarts, _ = _pool(monkeypatch, spares=spares, max_restarts=0)

    async def scenario():
        pool.start(1)
        pool.actors["gen0"].dead = True
        with pytest.raises(RuntimeError, match="generation pool: worker gen0 died and the 0 allowed restarts are "
                                               "used up") as info:
            await asyncio.wait_for(pool.call("generate"), 5)
        assert isinstance(info.value.__cause__, ray.exceptions.RayActorError)
        assert restarts == [] and len(made) == 1 + spares and list(pool.spares) == [f"gen{i + 1}" for i in range(spares)]

    asyncio.run(scenario())


def test_a_spare_that_cannot_start_ends_the_job_with_its_cause(monkeypatch):
    pool, *_ = _pool(monkeypatch, prepare_fails=True)

    async def scenario():
        pool.start(1)
        pool.actors["gen0"].dead = True
        assert (await pool.call("generate"))[0] == "gen1"  # the spare serves at once
        await asyncio.gather(*pool._refills, return_exceptions=True)
        with pytest.raises(RuntimeError, match="could not load the weights"):
            pool._check_refills()

    asyncio.run(scenario())


def test_kill_ends_the_spares_too(monkeypatch):
    pool, *_ = _pool(monkeypatch)
    killed = []
    monkeypatch.setattr(pools.ray, "kill", lambda actor, no_restart: killed.append(actor.name))
    pool.start(1)
    pool.kill()
    assert killed == ["gen0", "gen1"] and not pool.spares and not pool.actors


def test_a_spare_that_died_unseen_is_passed_over_when_a_worker_dies(monkeypatch):
    # Its node went down with the worker's: the first spare is dead too. The next one stands in;
    # the dead one is lost and made again behind, both counted as restarts.
    pool, made, prepared, restarts, changes = _pool(monkeypatch, spares=2)

    async def scenario():
        pool.start(1)
        pool.actors["gen0"].dead = pool.spares["gen1"].dead = True
        assert (await asyncio.wait_for(pool.call("generate"), 5))[0] == "gen2"
        assert restarts == [("gen0", "gen2", True)] and pool.restarts == 2
        await _settled(pool)
        assert changes[0] == "gen1" and sorted(pool.spares) == ["gen3", "gen4"]

    asyncio.run(scenario())
