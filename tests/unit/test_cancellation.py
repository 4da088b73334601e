"""A cancelled wait ends: Python 3.11's `asyncio.wait_for` returns its awaitable's result when a
cancellation arrives as that awaitable finishes, swallowing the cancellation. A loop around it
(the driver's wait for a batch, a heartbeat round) then never ends, and the job's TaskGroup, which
cancelled it because another task failed, waits for it forever: a clean-clone suite hung so, the
broken agent's error held back by a step loop that went on waiting. `asyncio.timeout` counts
cancellations and does not lose one."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from types import SimpleNamespace

from actors.driver import Driver

REPO = Path(__file__).resolve().parents[2]


def _waiting_driver() -> SimpleNamespace:
    """What `Driver._take` uses: a buffer that never has a batch, a watchdog polled every 10 s."""
    return SimpleNamespace(
        changed=asyncio.Condition(),
        learner=SimpleNamespace(
            state=SimpleNamespace(take=lambda step: (None, 0), watchdog=SimpleNamespace(poll_s=lambda: 10.0))
        ),
        stop=SimpleNamespace(requested=False),
    )


def test_the_wait_for_a_batch_ends_when_cancelled_as_a_group_arrives():
    async def main() -> bool:
        driver = _waiting_driver()
        take = asyncio.create_task(Driver._take(driver, 0))  # type: ignore[arg-type]
        for _ in range(3):
            await asyncio.sleep(0)  # waiting on the condition now
        async with driver.changed:  # a rollout buffers a group...
            driver.changed.notify_all()
        take.cancel()  # ...as another's failure makes the job's TaskGroup cancel the step loop
        await asyncio.wait([take], timeout=2.0)
        return take.done() and take.cancelled()  # read here: `asyncio.run` cancels what is left on its way out

    assert asyncio.run(main()), "the step loop went on waiting after it was cancelled"


def test_no_asyncio_wait_for_in_the_project():
    offenders = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for folder in ("rlhf_cluster", "actors", "benchmarks")
        for path in sorted((REPO / folder).rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "wait_for"
        and isinstance(node.value, ast.Name) and node.value.id == "asyncio"
    ]
    assert not offenders, f"use `async with asyncio.timeout(s):` (see this file's docstring): {offenders}"
