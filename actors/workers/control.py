"""JobController: a named actor through which a running job is steered from outside (scaling).

The driver creates it as `rlhf-controller-<job name>` in the `rlhf_cluster` namespace; the CLI
or Python (`scale(...)`) finds it by name. Requests queue up and the driver applies them one
at a time between its own awaits, so a resize never races a dispatch decision.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray

NAMESPACE = "rlhf_cluster"
POOLS = ("generation", "reward", "reference", "teacher", "judge")
SCORING = ("reward", "reference", "teacher")  # what `scoring` resizes: those of them the job runs


def controller_name(job_name: str) -> str:
    return f"rlhf-controller-{job_name}"


@ray.remote(num_cpus=0)
class JobController:
    """Queue of scale requests for one job, and the pool sizes the driver last reported."""

    def __init__(self) -> None:
        self._requests: asyncio.Queue = asyncio.Queue()
        self._applied: dict[int, dict] = {}
        self._next_ticket = 0
        self.sizes: dict[str, int] = {}

    async def request_scale(self, pool: str, replicas: int | None) -> int:
        """Queue a resize of `pool` (which pins its size), or with `replicas` None the pool's
        release to the autoscaler (`scale --auto`); returns the request's ticket."""
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}; scalable pools: {', '.join(POOLS)}")
        if replicas is not None and replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        ticket = self._next_ticket
        self._next_ticket += 1
        await self._requests.put((ticket, pool, replicas))
        return ticket

    async def next_request(self) -> tuple[int, str, int | None]:
        return await self._requests.get()

    async def applied(self, ticket: int, outcome: dict) -> None:
        self._applied[ticket] = outcome
        self.sizes = outcome.get("sizes", self.sizes)

    async def outcome(self, ticket: int) -> dict | None:
        return self._applied.get(ticket)

    async def report_sizes(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes

    async def get_sizes(self) -> dict[str, int]:
        return self.sizes


def scale(job_name: str, pool: str, replicas: int | None, timeout: float = 300.0) -> dict:
    """Resize `pool` of the running job `job_name` and wait until the driver has applied it. A
    size set here pins the pool: the autoscaler (`scaling.auto`) leaves it alone until `replicas`
    None (`rlhf-cluster scale --auto`) hands it back, with no resize.

    Needs a connected Ray client (`ray.init(address=...)`) on the job's cluster. Pool
    `scoring` resizes the reward pool and the reference pool (with distillation, the teacher's).
    """
    # Any: a handle's methods are looked up at run time (ray's stubs type its __getattr__ as Never).
    controller: Any = ray.get_actor(controller_name(job_name), namespace=NAMESPACE)
    pools: tuple[str, ...] = (pool,)
    if pool == "scoring":
        running = ray.get(controller.get_sizes.remote())
        pools = tuple(name for name in SCORING if name in running)
        if not pools:  # the driver reports its pools' sizes as it starts them
            raise RuntimeError(f"job {job_name}: no scoring pool is running (yet); pools: {sorted(running)}")
    outcomes: dict[str, dict] = {}
    for name in pools:
        ticket = ray.get(controller.request_scale.remote(name, replicas))
        deadline = time.monotonic() + timeout
        while (outcome := ray.get(controller.outcome.remote(ticket))) is None:
            if time.monotonic() > deadline:
                what = f"resize of {name} to {replicas}" if replicas is not None else f"release of {name}"
                raise TimeoutError(f"job {job_name}: {what} not applied in {timeout:.0f}s")
            time.sleep(0.2)
        if "error" in outcome:
            what = "resize" if replicas is not None else "release"
            raise RuntimeError(f"job {job_name}: {what} of {name} failed: {outcome['error']}")
        outcomes[name] = outcome
    return outcomes
