"""What every actor does at start: its console, tracer and metrics endpoint (`start_actor`), and
what every worker is besides its work (`Worker`: name, labels, `info`, heartbeat, stall clock).

Actor modules reach metric collectors through the `rlhf_cluster.telemetry.metrics` module, never as
imported globals: Ray pickles actor classes by value, and a collector (it holds a lock) cannot
be pickled.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import ray

from actors.workers.settings import ActorBasics
from rlhf_cluster.telemetry import tracing
from rlhf_cluster.telemetry.console import attach_console
from rlhf_cluster.telemetry.liveness import StallClock
from rlhf_cluster.telemetry.metrics import MetricLabels, serve_metrics

if TYPE_CHECKING:
    from rlhf_cluster.telemetry.liveness import Heartbeat


def start_actor(basics: ActorBasics, pool: str, worker: str) -> tuple[MetricLabels, int | None]:
    """The actor's console, tracer (its spans travel back on the heartbeats it answers) and
    /metrics endpoint; returns its metric labels and the endpoint's port (None: metrics off)."""
    attach_console()  # the actor's log lines reach the driver's console (Ray forwards its stdout)
    metrics = basics.metrics
    if metrics.trace:
        tracing.start(worker, pool)
    labels = MetricLabels(job=basics.job, pool=pool, worker=worker)
    port = serve_metrics(metrics.bind_address, port_range=metrics.port_range) if metrics.enabled else None
    return labels, port


def metrics_target(bind_address: str, port: int | None) -> str | None:
    """`host:port` Prometheus can scrape: the node's IP when bound to all interfaces."""
    if port is None:
        return None
    host = ray.util.get_node_ip_address() if bind_address in ("0.0.0.0", "::") else bind_address
    return f"{host}:{port}"


class Worker:
    """What every worker actor is besides its work: a name (`gen0`, `reward1`, `rank0`), its pool's
    metric labels and /metrics endpoint (`start_actor`), `info()` for the scrape targets, and a
    heartbeat answered on a thread of its own (the `health` concurrency group) with the trace spans
    recorded since the last one and how long its engine has gone without a step (`stall`, which an
    engine's loop steps; a worker without an engine reports 0).

    A worker class derives from it, calls `super().__init__(basics, pool, name)` first thing in
    its constructor, declares `concurrency_groups={"health": 1}` in its `@ray.remote` (Ray reads
    the group of the inherited `heartbeat` from the class it decorates), and adds what its `info`
    says besides the name, the metrics target and the pid in `info_extra`."""

    def __init__(self, basics: ActorBasics, pool: str, name: str):
        self.name = name
        self.labels, self.metrics_port = start_actor(basics, pool, name)
        self.metrics_target = metrics_target(basics.metrics.bind_address, self.metrics_port)
        self.stall = StallClock()

    def info(self) -> dict:
        """Name, Prometheus target (None: metrics off), pid, and the class's own (`info_extra`)."""
        return {"name": self.name, "metrics": self.metrics_target, "pid": os.getpid(), **self.info_extra()}

    def info_extra(self) -> dict:
        return {}

    @ray.method(concurrency_group="health")
    def heartbeat(self) -> dict:
        """Answered on its own thread while a call runs: a stopped process does not answer, a hung
        engine reports how long it has gone without a step."""
        return {"stalled_s": self.stall.stalled_s(), "spans": tracing.drain()}


def limit_threads(share: int) -> None:
    """Give this process its share of the node's cores so co-located actors do not thrash."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, share)))


def rendezvous_address() -> tuple[str, int]:
    """This node's IP and a free port, for a torch.distributed group's rank 0 to host the rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


def join_process_group(
    master_addr: str, master_port: int, rank: int, world_size: int, timeout_s: float = 300.0
) -> None:
    """Join the group (gloo on CPU, nccl on CUDA); every rank calls it at once. A collective
    that waits `timeout_s` for a peer fails instead of waiting forever."""
    import datetime

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))


async def heartbeat(actor, timeout_s: float) -> Heartbeat:
    """One heartbeat to `actor` (its `heartbeat()` answers `{"stalled_s": ...}`), bounded by
    `timeout_s`."""
    import asyncio

    from rlhf_cluster.telemetry.liveness import Heartbeat

    try:
        async with asyncio.timeout(timeout_s):
            reply = await actor.heartbeat.remote()
    except TimeoutError:
        return Heartbeat(answered=False)
    except ray.exceptions.RayActorError:
        return Heartbeat(answered=False, dead=True)
    return Heartbeat(answered=True, stalled_s=reply["stalled_s"], spans=reply.get("spans", []))
