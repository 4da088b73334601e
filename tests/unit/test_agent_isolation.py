"""Agent calls in processes of their own (`rlhf_cluster.gateway.isolation`, real child processes):
an agent that sleeps forever, allocates without bound, exits its process or raises fails only its
own call, with its kind, and the slot serves the next call."""

from __future__ import annotations

import asyncio
import time

import pytest

from rlhf_cluster.gateway.isolation import AgentFailed, AgentProcesses

SPEC = "tests.integration.misbehaving_agent:direct"


def _call(processes: AgentProcesses, what: str, timeout_s: float = 30.0):
    return processes.call("http://unused", "key", [{"role": "user", "content": what}], timeout_s)


def test_each_misbehaviour_costs_only_its_call_and_the_slot_serves_the_next():
    async def scenario():
        processes = AgentProcesses(SPEC, slots=1, memory_mb=256)
        try:
            assert await _call(processes, "fine") == 1.0
            outcomes = {}
            for what, timeout_s in (("sleep", 2.0), ("hog", 60.0), ("exit", 30.0), ("raise", 30.0)):
                began = time.monotonic()
                with pytest.raises(AgentFailed) as failed:
                    await _call(processes, what, timeout_s)
                outcomes[what] = (failed.value.kind, str(failed.value), time.monotonic() - began)
                assert await _call(processes, "fine") == 1.0  # the one slot serves again
            return outcomes, processes.started
        finally:
            await processes.close()

    outcomes, started = asyncio.run(scenario())
    assert outcomes["sleep"][0] == "timeout" and outcomes["sleep"][2] < 10, outcomes["sleep"]  # killed at 2 s
    # Capped at 256 MB beyond its start: a MemoryError in the agent (or, where it cannot even report that, its death).
    assert outcomes["hog"][:2] == ("raised", "raised MemoryError: ") or outcomes["hog"][0] == "died", outcomes["hog"]
    assert outcomes["exit"][:2] == ("died", "the agent's process ended (exit status 3) during the episode")
    assert outcomes["raise"][0] == "raised" and "the agent's own bug" in outcomes["raise"][1]
    assert started == 5  # the first child, and a new one after each failed call


def test_slots_bound_the_calls_at_once_and_a_broken_agent_module_is_named():
    async def scenario():
        processes = AgentProcesses(SPEC, slots=2, memory_mb=256)
        try:
            results = await asyncio.gather(*(_call(processes, "fine") for _ in range(5)))
            return results, processes.started
        finally:
            await processes.close()

    results, started = asyncio.run(scenario())
    assert results == [1.0] * 5 and started == 2

    async def broken():
        processes = AgentProcesses("tests.integration.no_such_agent:run", slots=1, memory_mb=256)
        with pytest.raises(AgentFailed, match="could not load tests.integration.no_such_agent:run.*not found"):
            await _call(processes, "fine")

    asyncio.run(broken())
