"""torch.distributed groups for tests that run distributed code in the pytest process."""

from __future__ import annotations

import contextlib
import os
import socket
import sys


@contextlib.contextmanager
def one_rank_process_group(backend: str):
    """A one-rank torch.distributed group in this process, on a free loopback port, destroyed after."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
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
