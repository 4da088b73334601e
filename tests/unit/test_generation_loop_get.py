"""`LoopGet`, the object store's `get` a GenerationWorker hands its weight transports: the engine
fetches a delivery in a thread (`asyncio.to_thread`), and the bucket refs are awaited on the actor's
event loop, which keeps serving other calls meanwhile. (With `ray.get` there Ray printed "Using
blocking ray.get inside async actor" in every job: Ray warns of any ray.get in an async actor, on
any thread.) The refs here are asyncio futures, awaitable as Ray's ObjectRefs are."""

from __future__ import annotations

import asyncio

import pytest

from actors.workers.generation import LoopGet


def test_a_fetch_thread_gets_the_refs_awaited_on_the_loop_which_keeps_running():
    async def main():
        get = LoopGet()
        get.bind()
        loop = asyncio.get_running_loop()
        refs = [loop.create_future() for _ in range(3)]
        ticks = 0

        async def heartbeat():  # another call on the loop: answered while the fetch thread waits
            nonlocal ticks
            while not all(r.done() for r in refs):
                ticks += 1
                if ticks >= 5:  # only a loop that runs gets here, and only then do the refs arrive
                    for i, r in enumerate(refs):
                        r.set_result(f"bucket{i}")
                await asyncio.sleep(0.01)

        beats = asyncio.create_task(heartbeat())
        got = await asyncio.wait_for(asyncio.to_thread(get, refs), timeout=10)
        await beats
        return got, ticks

    got, ticks = asyncio.run(main())
    assert got == ["bucket0", "bucket1", "bucket2"] and ticks >= 5


def test_a_failed_ref_fails_the_fetch_with_its_error():
    async def main():
        get = LoopGet()
        get.bind()
        failed = asyncio.get_running_loop().create_future()
        failed.set_exception(ConnectionError("object lost"))
        return await asyncio.to_thread(get, [failed])

    with pytest.raises(ConnectionError, match="object lost"):
        asyncio.run(main())


def test_it_refuses_to_wait_on_the_loop_it_would_block_or_with_none_bound():
    with pytest.raises(RuntimeError, match="no event loop bound"):
        LoopGet()([])

    async def on_the_loop():
        get = LoopGet()
        get.bind()
        get([])

    with pytest.raises(RuntimeError, match="event loop's own thread"):
        asyncio.run(on_the_loop())
