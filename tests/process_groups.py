"""torch.distributed groups for tests: one rank in the pytest process, or ranks in spawned processes."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import traceback
from typing import Any


def free_port() -> int:
    """A loopback port free at the time of asking."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rank(target, rank: int, port: int, *args) -> None:
    """A spawned rank: `target`, then out without the interpreter's finalization (exit 0, or 1 if it
    raised), what it put flushed first. At finalization a gloo thread alive after
    `destroy_process_group` aborted a rank now and then ("terminate called without an active
    exception", exit -6; 2 of 14 runs of test_weight_gather on a 2-core EPYC, its results all correct)."""
    results, code = args[-1], 0
    try:
        target(rank, port, *args)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        results.close()
        results.join_thread()
        os._exit(code)


def spawn_ranks(target, world: int, *args) -> tuple[Any, list]:
    """`world` spawned processes, started, each running `target(rank, port, *args, results)`: one free
    loopback port for their group, and one queue for what they put. (results, the processes)."""
    import torch.multiprocessing as mp

    port = free_port()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_run_rank, args=(target, rank, port, *args, results)) for rank in range(world)]
    for p in procs:
        p.start()
    return results, procs


def join_ranks(procs: list, timeout: float = 30) -> None:
    """Waits up to `timeout` s for each process of `spawn_ranks`, and kills any still running then."""
    for p in procs:
        p.join(timeout=timeout)
        if p.is_alive():
            p.kill()


@contextlib.contextmanager
def one_rank_process_group(backend: str):
    """A one-rank torch.distributed group in this process, on a free loopback port, destroyed after."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        # DeepSpeed keeps a clone of the world group it made in this process; a later group would
        # find it destroyed ("Group ... is not registered"). Its own teardown releases it so.
        groups = sys.modules.get("deepspeed.utils.groups")
        if groups is not None:
            groups._release_process_group_references()
