"""CallCoalescer: calls that wait for a busy worker leave together; every caller gets its own results."""

import asyncio

import pytest

from rlhf_cluster.scoring.call_coalescing import CallCoalescer


class FakeWorkers:
    """A scoring pool stand-in: each send takes until released, and records what it was sent."""

    def __init__(self):
        self.sent: list[list[int]] = []
        self.gates: list[asyncio.Event] = []
        self.fail_with: BaseException | None = None

    async def send(self, items: list[int]) -> list[int]:
        self.sent.append(list(items))
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return [10 * x for x in items]

    async def release(self, index: int) -> None:
        while len(self.gates) <= index:
            await asyncio.sleep(0)
        self.gates[index].set()


async def settle():
    for _ in range(10):
        await asyncio.sleep(0)


async def one_busy_worker(items: list[int]) -> tuple[FakeWorkers, CallCoalescer, asyncio.Task]:
    """A one-worker pool, its coalescer, and the task of a first call of `items`, already sent."""
    workers = FakeWorkers()
    coalescer = CallCoalescer(workers.send, capacity=lambda: 1)
    first = asyncio.create_task(coalescer(items))
    await settle()
    return workers, coalescer, first


def test_idle_pool_sends_at_once_and_busy_pool_joins_the_backlog():
    async def scenario():
        workers, coalescer, first = await one_busy_worker([1, 2])
        assert workers.sent == [[1, 2]]  # nothing in flight: sent without waiting for company
        later = [asyncio.create_task(coalescer([k])) for k in (3, 4, 5)]
        await settle()
        assert workers.sent == [[1, 2]]  # the one worker is busy: the three wait
        await workers.release(0)
        assert await first == [10, 20]
        await settle()
        assert workers.sent == [[1, 2], [3, 4, 5]]  # ...and leave as one call
        await workers.release(1)
        assert [await t for t in later] == [[30], [40], [50]]

    asyncio.run(scenario())


def test_capacity_is_read_at_each_dispatch():
    async def scenario():
        workers = FakeWorkers()
        size = {"workers": 2}
        coalescer = CallCoalescer(workers.send, capacity=lambda: size["workers"])
        a = asyncio.create_task(coalescer([1]))
        await settle()
        b = asyncio.create_task(coalescer([2]))
        await settle()
        assert workers.sent == [[1], [2]]  # two workers: two sends in flight
        size["workers"] = 1  # the pool shrank
        await workers.release(0)
        await a
        c = asyncio.create_task(coalescer([3]))
        await settle()
        assert workers.sent == [[1], [2]]  # one still in flight and capacity is 1 now
        await workers.release(1)
        await b
        await settle()
        assert workers.sent == [[1], [2], [3]]
        await workers.release(2)
        assert await c == [30]

    asyncio.run(scenario())


def test_a_failed_send_fails_every_call_joined_into_it():
    async def scenario():
        workers, coalescer, first = await one_busy_worker([1])
        joined = [asyncio.create_task(coalescer([k])) for k in (2, 3)]
        await workers.release(0)
        await first
        workers.fail_with = RuntimeError("reward worker: no reference answer for prompt 'p7'")
        await workers.release(1)
        for task in joined:
            with pytest.raises(RuntimeError, match="no reference answer"):
                await task
        workers.fail_with = None  # the coalescer keeps serving after a failure
        after = asyncio.create_task(coalescer([4]))
        await workers.release(2)
        assert await after == [40]

    asyncio.run(scenario())


def test_a_send_that_returns_the_wrong_count_is_an_error():
    async def short(items):
        return items[:-1]

    async def scenario():
        with pytest.raises(RuntimeError, match="returned 1 results for 2 items"):
            await CallCoalescer(short, capacity=lambda: 1)([1, 2])

    asyncio.run(scenario())


def test_a_cancelled_caller_does_not_disturb_the_others():
    async def scenario():
        workers, coalescer, first = await one_busy_worker([1])
        gone, kept = asyncio.create_task(coalescer([2])), asyncio.create_task(coalescer([3]))
        await settle()
        gone.cancel()  # e.g. a rollout of a timeline a rollback abandoned
        await workers.release(0)
        await first
        await workers.release(1)
        assert await kept == [30]
        assert workers.sent[1] == [3]  # what the cancelled caller waited with is not sent

    asyncio.run(scenario())


def test_a_send_carries_at_most_max_items_and_free_workers_take_the_rest():
    async def scenario():
        workers = FakeWorkers()
        size = {"workers": 1}
        coalescer = CallCoalescer(workers.send, capacity=lambda: size["workers"], max_items=4)
        first = asyncio.create_task(coalescer([0]))
        await settle()
        # Two steps' groups finish together behind the busy worker: 4 groups of 2 samples.
        groups = [asyncio.create_task(coalescer([10 * g + 1, 10 * g + 2])) for g in range(1, 5)]
        await settle()
        size["workers"] = 2  # a second worker joins while they wait
        await workers.release(0)
        await first
        await settle()
        # Both workers are free: the backlog leaves as two sends of one step's worth (4 items) each.
        assert workers.sent[1:] == [[11, 12, 21, 22], [31, 32, 41, 42]]
        await workers.release(1)
        await workers.release(2)
        assert [await t for t in groups] == [[110, 120], [210, 220], [310, 320], [410, 420]]
        # One call larger than max_items still goes, alone.
        big = asyncio.create_task(coalescer([1, 2, 3, 4, 5, 6]))
        await settle()
        assert workers.sent[3] == [1, 2, 3, 4, 5, 6]
        await workers.release(3)
        assert len(await big) == 6

    asyncio.run(scenario())


def test_a_backlog_spreads_over_the_free_workers_by_its_share():
    async def scenario():
        workers = FakeWorkers()
        coalescer = CallCoalescer(workers.send, capacity=lambda: 3, max_items=16)
        first = asyncio.create_task(coalescer([0]))
        await settle()
        # A step's six groups finish at one engine step, one worker busy, two free: each free one
        # takes its share (6 items / 2 free workers), not one of them all six while the other idles.
        groups = [asyncio.create_task(coalescer([g])) for g in range(1, 7)]
        await settle()
        assert workers.sent == [[0], [1, 2, 3], [4, 5, 6]]
        # Behind three busy workers, a backlog leaves whole to the first that frees.
        later = [asyncio.create_task(coalescer([g])) for g in (7, 8)]
        await settle()
        await workers.release(0)
        await first
        await settle()
        assert workers.sent[3] == [7, 8]
        for i in (1, 2, 3):
            await workers.release(i)
        assert [await t for t in groups + later] == [[10 * g] for g in range(1, 9)]

    asyncio.run(scenario())


def test_the_queue_is_the_items_waiting_for_a_free_worker_integrated_over_time(monkeypatch):
    from rlhf_cluster.scoring import call_coalescing

    clock = {"now": 100.0}
    monkeypatch.setattr(call_coalescing.time, "monotonic", lambda: clock["now"])

    async def scenario():
        workers, coalescer, first = await one_busy_worker([1])
        assert coalescer.waited_item_seconds() == 0.0  # sent at once: it never waited
        later = [asyncio.create_task(coalescer([k, k])) for k in (2, 3)]  # 4 items behind the busy worker
        await settle()
        clock["now"] += 2.5
        assert coalescer.waited_item_seconds() == 10.0  # 4 items x 2.5 s
        await workers.release(0)
        await first
        await settle()  # they leave, joined: the queue is empty again
        clock["now"] += 7.0
        assert coalescer.waited_item_seconds() == 10.0
        await workers.release(1)
        assert [await t for t in later] == [[20, 20], [30, 30]]

    asyncio.run(scenario())
