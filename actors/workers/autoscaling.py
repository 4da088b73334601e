"""The driver's side of the autoscaler (`rlhf_cluster/job/autoscale.py`): each step's row goes in,
its decisions come out as resizes through the cluster's own resize (the one `rlhf-cluster scale`
takes), each an `autoscaled` row of events.jsonl and a Prometheus count; and `Placement`, which
holds a grow to what the cluster can place (or asks Ray's autoscaler for it)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from rlhf_cluster.config import JobConfig
from rlhf_cluster.job.autoscale import Autoscaler, Decision, fits, resource_bundles
from rlhf_cluster.job.placement import resource_plan
from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.telemetry import metrics as m

log = logging.getLogger(__name__)


def _available() -> dict[str, float]:
    import ray

    return ray.available_resources()


def _request_resources(bundles: list[dict[str, float]]) -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


class Placement:
    """Whether a grow can be placed. Without Ray's autoscaler (the default), the workers it adds
    must fit in the cluster's free resources now (`ray.available_resources()`, summed over nodes).
    With `scaling.request_nodes`, every grow fits: Ray's autoscaler is asked first for the
    resources of every worker at the new sizes (`request_resources`), and adds nodes for them."""

    def __init__(
        self,
        per_actor: Mapping[str, Mapping[str, float]],
        request_nodes: bool,
        available: Callable[[], Mapping[str, float]] = _available,
        request: Callable[[list[dict[str, float]]], None] = _request_resources,
    ):
        self.per_actor, self.request_nodes = per_actor, request_nodes
        self.available, self.request = available, request

    def allows(self, decision: Decision) -> bool:
        if self.request_nodes:
            return True
        return fits(decision, self.available(), self.per_actor.get(decision.pool, {}))

    def reserve(self, sizes: Mapping[str, int]) -> None:
        """Before a resize to `sizes`: with Ray's autoscaler, ask it to hold them (the whole demand)."""
        if self.request_nodes:
            self.request(resource_bundles(sizes, self.per_actor))


Resize = Callable[[str, int, str], Awaitable[Any]]  # (pool, replicas, source): the cluster's resize


class PoolAutoscaling:
    """The job's autoscaler between steps and resizes. `observe` is called on the driver's loop
    after each step; `run` applies the decisions, one at a time, until cancelled (a failed resize is
    an `autoscale_failed` event, not the job's end). Rows seen while a resize runs are not observed
    (they were measured at the old sizes). `pin`/`release`: a manual `scale` and `scale --auto`."""

    def __init__(
        self,
        cfg: JobConfig,
        run_dir: RunDir,
        sizes: Callable[[], dict[str, int]],
        resize: Resize,
        placement: Placement | None = None,
    ):
        self.job, self.run_dir, self.sizes, self.resize = cfg.name, run_dir, sizes, resize
        self.autoscaler = Autoscaler(cfg.scaling.auto)
        self.placement = placement or Placement(
            {req.pool: req.per_actor for req in resource_plan(cfg)}, cfg.scaling.request_nodes
        )
        self.pending: asyncio.Queue[Decision] = asyncio.Queue()
        self.busy = False  # a decision is queued or being applied

    def auto_pools(self, pinned_too: bool = False) -> list[str]:
        """The job's pools the autoscaler may resize (enabled, not pinned; `pinned_too`: enabled)."""
        auto = self.autoscaler.auto
        return [p for p in self.sizes() if auto.of(p).enabled and (pinned_too or p not in self.autoscaler.pinned)]

    def started(self, spares: Mapping[str, int] | None = None) -> None:
        """The pools are up: their sizes (and warm spares, by pool) as events.jsonl's
        `pools_started` row and as gauges."""
        sizes = self.sizes()
        spares = dict(spares or {})
        self.run_dir.event("pools_started", sizes=sizes, auto=self.auto_pools(), spares=spares)
        for pool, n in sizes.items():
            self.sized(pool, n)
            m.POOL_SPARES.labels(job=self.job, pool=pool, worker="driver").set(spares.get(pool, 0))

    def sized(self, pool: str, replicas: int) -> None:
        m.POOL_TARGET_REPLICAS.labels(job=self.job, pool=pool, worker="driver").set(replicas)

    def pin(self, pool: str) -> None:
        self.autoscaler.pin(pool)

    def release(self, pool: str) -> None:
        self.autoscaler.release(pool)
        self.run_dir.event("scale_released", pool=pool)

    def observe(self, row: Mapping[str, Any]) -> None:
        """One step's row; a decision is queued for `run`."""
        if self.busy or not self.autoscaler.auto.active:
            return
        numbers = {k: float(v) for k, v in row.items() if isinstance(v, int | float)}
        for decision in self.autoscaler.observe(numbers, self.sizes(), time.monotonic(), self.placement.allows):
            self.busy = True
            self.pending.put_nowait(decision)

    async def run(self) -> None:
        while True:
            decision = await self.pending.get()
            try:
                await self.apply(decision)
            finally:
                self.busy = False

    async def apply(self, d: Decision) -> None:
        """Resize as `d` says, unless the pool was pinned or resized by hand since it was decided."""
        if d.pool in self.autoscaler.pinned or self.sizes().get(d.pool) != d.current:
            log.info(f"autoscaler: {d.pool} changed by hand since its decision; left alone")
            return
        try:
            self.placement.reserve({**self.sizes(), d.pool: d.replicas})
            await self.resize(d.pool, d.replicas, "auto")
        except Exception as exc:  # the job goes on at its sizes; the next window decides again
            self.run_dir.event("autoscale_failed", pool=d.pool, to=d.replicas, error=repr(exc)[:500])
            log.warning(f"autoscaler: resizing {d.pool} to {d.replicas} failed: {exc!r}")
        else:
            self.run_dir.event("autoscaled", pool=d.pool, to=d.replicas, reason=d.reason, **{"from": d.current})
            m.AUTOSCALER_DECISIONS.labels(job=self.job, pool=d.pool, worker="driver", direction=d.direction).inc()
            log.info(f"autoscaler: {d.pool} {d.current} -> {d.replicas}: {d.reason}")
        self.autoscaler.applied(d.pool, time.monotonic())
