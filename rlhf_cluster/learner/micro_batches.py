"""A learner step's passes: rows dealt into micro-batches by a token budget, each with its packed
layout, planned on the host so that planning never waits for the device."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist

from rlhf_cluster.experience.records import TrainBatch
from rlhf_cluster.models.packing import (
    PackedRows,
    packing_pays,
    plan_packing,
    row_tokens_for,
    to_device,
    token_budget_micro_batches,
)
from rlhf_cluster.models.sequence_rows import ShardPlan, plan_shard

Rows = slice | torch.Tensor  # a micro-batch's rows of the step's batch: a range, or row indices
# A vision-language policy's extra inputs of a pass's rows (`images.LearnerImages.inputs`), None without images.
VisionInputs = Callable[[list[int]], "dict[str, torch.Tensor] | None"]


class MicroBatch(NamedTuple):
    """One forward/backward pass: its rows of the step's batch, whether they count (a padding pass
    only keeps the sharded backends' collectives paired; its loss counts zero) and, when packing,
    where its real tokens sit (planned on the host), and with sequence parallelism this rank's part
    of its packed rows (`ShardPlan`); a vision-language policy's rows with images, their extra
    model inputs on the device (`inputs`: pixel values, grids, multimodal rotary positions)."""

    rows: Rows
    real: bool
    packing: PackedRows | None = None
    shard: ShardPlan | None = None
    inputs: dict[str, torch.Tensor] | None = None


def plan_micro_batches(
    local: TrainBatch,
    lo: int,
    hi: int,
    budget: int | None,
    packed: bool,
    device: torch.device,
    attention: str,
    host_group: dist.ProcessGroup | None,
    split: tuple[int, int] | None = None,
    vision: VisionInputs | None = None,
) -> list[MicroBatch]:
    """Rows [lo, hi) of the host batch `local` dealt into micro-batches of at most `budget` tokens
    (real tokens when `packed`, padded ones otherwise; None: one micro-batch; the learner's
    `memory_plan`), balanced by tokens. Every rank runs the same number of
    forward/backward passes (the sharded backends' collectives must pair up): a rank with fewer pads
    with `real=False` passes on one row. The count is agreed over `host_group` (gloo).
    `split`: (group size, this rank's place in it) under sequence parallelism, which splits packed
    rows: packed even where it holds no fewer slots, each pass with its `ShardPlan`.
    `vision`: a vision-language policy's extra inputs of a pass's rows, made here once per step;
    rows [lo, hi) with an image are not packed (their budget counts padded rows, images included)."""
    if vision is not None and has_images(local, lo, hi):
        if split is not None:
            raise ValueError("learner.sequence_parallel splits packed rows: rows with images are not packed")
        packed = False
    else:
        vision = None

    def made(indices: list[int], real: bool) -> MicroBatch:
        micro = micro_batch(local, indices, real, packed, device, attention, split)
        return micro if vision is None else micro._replace(inputs=vision(indices))

    if budget is None:
        return [made(list(range(lo, hi)), True)]
    if packed:
        lengths = local.attention_mask[lo:hi].sum(1).tolist()
    else:
        lengths = [local.input_ids.shape[1]] * (hi - lo)
    own = [made([lo + i for i in part], True) for part in token_budget_micro_batches(lengths, budget)]
    count = torch.tensor([len(own)])
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=host_group)
    padding = made([lo], False)
    return own + [padding] * (int(count.item()) - len(own))


def has_images(batch: TrainBatch, lo: int, hi: int) -> bool:
    """Whether any of rows [lo, hi) of `batch` carries an image."""
    return batch.images is not None and any(batch.images[lo:hi])


def micro_batch(
    local: TrainBatch,
    indices: list[int],
    real: bool,
    packed: bool,
    device: torch.device,
    attention: str,
    split: tuple[int, int] | None = None,
) -> MicroBatch:
    """The pass over rows `indices` of the host batch `local`: its row indices and (`packed`, where
    `packing_pays` or with a `split`) its layout for a model running `attention`, and this rank's
    part of it (`split`: group size, rank in the group; `plan_shard`), on `device` by copies the
    host does not wait for."""
    contiguous = indices == list(range(indices[0], indices[0] + len(indices)))
    rows = slice(indices[0], indices[-1] + 1) if contiguous else to_device(torch.tensor(indices), device)
    if not packed:
        return MicroBatch(rows, real)
    lengths = local.attention_mask[indices].sum(1).tolist()
    packing = plan_packing(
        lengths,
        local.prompt_lengths[indices].tolist(),
        local.input_ids.shape[1],
        local.response_mask.shape[1],
        row_tokens_for(attention, lengths),
    )
    if split is None:
        if not packing_pays(packing, len(indices) * local.input_ids.shape[1]):
            return MicroBatch(rows, real)
        return MicroBatch(rows, real, packing.to(device))
    return MicroBatch(rows, real, packing.to(device), plan_shard(packing, *split).to(device))
