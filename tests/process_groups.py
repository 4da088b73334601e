"""torch.distributed groups for tests that run distributed code in the pytest process."""

from __future__ import annotations

import contextlib
import os
import socket


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
