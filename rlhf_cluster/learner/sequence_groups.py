"""The policy learner's sequence-parallel groups (`learner.sequence_parallel` N): consecutive ranks
[g * N, (g + 1) * N) share their rows, each running its 1/N of every packed row's slots
(`rlhf_cluster.models.sequence_parallel`).

The step's batch is dealt to every rank (`experience.build`); a group first joins its N shares,
so its ranks hold the same rows, dealt over world_size / N groups. Every rank of a group then
computes the same loss from the same log-probs (summed over the group), so its weight gradients
are its own tokens' part of the group's: the backends' average over all ranks, scaled by the world
size as always (`LearnerBase._accumulate`), adds them up to the batch's gradient, the same as
without sequence parallelism. What every rank of a group counts alike is counted N times by a sum
over the ranks: the loss denominators and the step's summed metrics are divided by N
(`StepMetrics`'s weight).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from rlhf_cluster.experience.records import TrainBatch
from rlhf_cluster.learner.micro_batches import MicroBatch
from rlhf_cluster.models.sequence_parallel import ATTENTION, shard_rows, sharded_response_logprobs


@dataclass(frozen=True)
class SequenceGroup:
    """This rank's sequence-parallel group: its size, this rank's place in it, and its process
    groups (the device's for the attention's all-to-all, gloo's for the rows' exchange)."""

    size: int
    rank: int
    group: dist.ProcessGroup
    host: dist.ProcessGroup


def sequence_group(size: int) -> SequenceGroup:
    """Collective (every rank creates every group, in order): this rank's group of `size`."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if size < 1 or world % size:
        raise ValueError(
            f"learner.sequence_parallel={size} must divide the learner's world size, {world} ranks "
            "(consecutive ranks form world_size / sequence_parallel groups)"
        )
    mine: tuple[dist.ProcessGroup, dist.ProcessGroup] | None = None
    for first in range(0, world, size):
        ranks = list(range(first, first + size))
        device = dist.new_group(ranks)
        host = device if dist.get_backend() == "gloo" else dist.new_group(ranks, backend="gloo")
        if rank in ranks:
            mine = (device, host)
    assert mine is not None  # size divides world: every rank is in one group
    return SequenceGroup(size, rank % size, *mine)


def group_share(local: TrainBatch, group: SequenceGroup | None) -> tuple[TrainBatch, int]:
    """Collective over the group: the rows this rank runs and how many ranks run them alike, by
    which the step divides what every rank of a group counts (the loss denominators,
    `StepMetrics`'s weight): this rank's share and 1 without sequence parallelism."""
    if group is None:
        return local, 1
    return joined_share(local, group), group.size


def joined_share(local: TrainBatch, group: SequenceGroup) -> TrainBatch:
    """Collective over the group: its ranks' host shares as one batch, in rank order."""
    shares: list[Any] = [None] * group.size
    dist.all_gather_object(shares, local, group=group.host)
    return concat_batches(shares)


def concat_batches(batches: list[TrainBatch]) -> TrainBatch:
    """Right-padded batches as one, each [B, width] field padded with zeros to the widest."""
    fields: dict[str, Any] = {}
    for name, first in vars(batches[0]).items():
        values = [getattr(b, name) for b in batches]
        if name == "routings":  # a share without routed experts holds None for each of its rows
            joined = [item for b in batches for item in (b.routings or [None] * len(b.sample_ids))]
            fields[name] = joined if any(r is not None for r in joined) else None
        elif first is None:
            fields[name] = None
        elif isinstance(first, torch.Tensor):
            width = max(v.shape[-1] for v in values) if first.dim() == 2 else 0
            pad = [torch.nn.functional.pad(v, (0, width - v.shape[-1])) if v.dim() == 2 else v for v in values]
            fields[name] = torch.cat(pad)
        else:
            fields[name] = [item for v in values for item in v]
    return TrainBatch(**fields)


def model_attention(implementation: str) -> str:
    """The attention a switched model runs on the whole rows (its name without `ATTENTION`_)."""
    return implementation.removeprefix(f"{ATTENTION}_")


def group_logprobs(
    model: Any, b: TrainBatch, micro: MicroBatch, group: SequenceGroup, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`response_logprobs` of the micro-batch's packed rows, split over the group
    (`sharded_response_logprobs`): [rows, T], the same on every rank of it."""
    packing, shard = micro.packing, micro.shard
    if packing is None or shard is None:
        raise ValueError("learner.sequence_parallel runs packed rows only (learner.sequence_packing)")
    packed = packing.input_ids(b.input_ids[micro.rows])
    rows = shard_rows(packed, packing.position_ids, packing.sequence_ids, group.size)
    attention = model_attention(getattr(model, "module", model).config._attn_implementation)
    layout = rows.layout(group.group, attention, shard.runs)  # the varlen runs the host planned
    return sharded_response_logprobs(model, rows, shard, group.rank, layout, temperature, with_entropy)
