"""How a version's tensors leave a learner's shards: each parameter gathered to the one rank that
sends it (`gathered_to`).

An FSDP2 parameter (a DTensor sharded on dim 0 over a 1-D mesh) is gathered on its sender alone
(`dist.gather` of the shards, padded to equal size), where `full_tensor()` all-gathers it to every
rank: at two ranks half the bytes cross, and no rank but the sender holds the full tensor (CPU,
gloo, 2 ranks, 104M fp32: the gathers of a version took 0.42 s all-gathered, 0.20 s so). Other
layouts fall back to `full_tensor()`.

Tried and left out: gathering in a thread ahead of the packing (so the ranks' gathers overlap
their packing instead of taking turns) made a push slower on a 2-core machine (1.55 s vs 0.93 s
for two ranks sending their shares, `python -m benchmarks.weight_sync --learner-ranks 2`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard


def gathered_to(tensor: DTensor, owner: int) -> torch.Tensor | None:
    """The full tensor on global rank `owner`; None on every other rank (each takes part)."""
    mesh = tensor.device_mesh
    if mesh.ndim != 1 or tuple(tensor.placements) != (Shard(0),) or tensor.ndim == 0:
        full = tensor.full_tensor()
        return full if dist.get_rank() == owner else None
    group = mesh.get_group()
    world = dist.get_world_size(group)
    rows = tensor.shape[0]
    chunk = -(-rows // world)  # FSDP2 shards dim 0 as torch.chunk does: equal chunks, the last ones short or empty
    local = tensor.to_local()
    if local.shape[0] != chunk or not local.is_contiguous():
        padded = local.new_zeros((chunk, *tensor.shape[1:]))
        padded[: local.shape[0]] = local
        local = padded
    if dist.get_rank() != owner:
        dist.gather(local, None, dst=owner, group=group)
        return None
    full = local.new_empty((chunk * world, *tensor.shape[1:]))
    dist.gather(local, list(full.chunk(world)), dst=owner, group=group)  # straight into its rows
    return full[:rows]
