"""Tensors in an FSDP2 parameter's layout, for code that keeps copies of sharded parameters (the
adapter bank's clients): this rank's part of one, a part made the parameter's DTensor again, a full
tensor laid out as a parameter without communication, and a DTensor gathered whole. Unsharded
parameters are plain tensors, and each function is then the identity."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (an FSDP2 parameter's shard; a plain tensor itself)."""
    return t.to_local() if isinstance(t, DTensor) else t


def like_param(part: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's part laid out as parameter `p` (a DTensor for a sharded one)."""
    if not isinstance(p, DTensor):
        return part
    return DTensor.from_local(part, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def laid_out(whole: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A whole tensor (the same on every rank) in `p`'s layout and dtype, with no communication."""
    whole = whole.to(device=local(p).device, dtype=p.dtype)
    if not isinstance(p, DTensor):
        return whole
    return distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a DTensor: every rank calls)."""
    return t.full_tensor() if isinstance(t, DTensor) else t
