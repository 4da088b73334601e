"""The rows' side of sequence parallelism (`sequence_parallel`): packed rows padded and split
along their length over the ranks of a group (`shard_rows`), the whole rows' layout every rank's
attention reads (`RowLayout`), and one rank's part of the learner's scored tokens planned on the
host with the packing (`ShardPlan`), so that a training forward never reads the device for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from rlhf_cluster.models.packing import PackedRows, document_block_mask, prepared_mask, to_device
from rlhf_cluster.models.varlen_attention import VARLEN, cu_seqlens_of


@dataclass
class RowLayout:
    """What the attention of every rank needs of the whole padded rows [R, P] in one forward: the
    group it is split over, the attention to run on the whole rows, and where each row's sequences
    are. Passed to the model's forward as `sequence_parallel=`."""

    group: dist.ProcessGroup | None  # None: the default group (or world 1, no communication)
    world: int
    attention: str  # the model's own attention, run on the whole rows
    position_ids: torch.Tensor  # [R, P]
    sequence_ids: torch.Tensor  # [R, P]: -1 on the padded tail
    runs: tuple[torch.Tensor, int] | None = None  # the rows' varlen runs planned on the host (`ShardPlan`)
    _masks: dict[torch.dtype, Any] = field(default_factory=dict, repr=False)
    _runs: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def varlen(self) -> bool:
        """Whether `attention` takes the sequences as varlen runs (flash-attention, varlen), no mask."""
        return self.attention.startswith("flash") or self.attention == VARLEN

    def varlen_kwargs(self) -> dict[str, Any]:
        """The whole rows' sequences as flash-attention's keyword arguments: the planned `runs`, else
        found from the position ids once per forward (one read of the device for the longest; the
        tail's slots, position 0 each, are runs of their own)."""
        if not self._runs:
            cu, longest = self.runs if self.runs is not None else cu_seqlens_of(self.position_ids)
            self._runs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        return self._runs

    def mask(self, dtype: torch.dtype) -> Any:
        """The whole rows' mask for `attention` (causal within each sequence; the tail attends to
        itself only), built once per forward and dtype; None for varlen attention (`varlen_kwargs`)."""
        if self.varlen:
            return None
        if dtype not in self._masks:
            if self.attention == "flex_attention":
                self._masks[dtype] = document_block_mask(self.sequence_ids)
            else:
                ids = self.sequence_ids
                self._masks[dtype] = prepared_mask(ids[:, :, None] == ids[:, None, :], self.attention, dtype)
        return self._masks[dtype]


@dataclass(frozen=True)
class ShardedRows:
    """Packed rows [R, C] split along the length over `world` ranks: padded to P slots, a multiple
    of `world` (the tail: token 0, position 0, sequence -1), the next-token targets taken on the
    whole rows. Rank r holds slots [r * P/world, (r + 1) * P/world) of every row. Pure tensors, on
    the host or a device."""

    input_ids: torch.Tensor  # [R, P]
    position_ids: torch.Tensor  # [R, P]: each slot's position within its own sequence
    sequence_ids: torch.Tensor  # [R, P]: which sequence of the row a slot belongs to, -1 on the tail
    targets: torch.Tensor  # [R, P]: the next slot's token (0 at a row's last slot)
    scored: torch.Tensor  # [R, P] bool: the next slot continues this slot's sequence
    world: int
    length: int  # C, the real width before padding

    @property
    def width(self) -> int:
        """Slots per rank."""
        return self.input_ids.shape[1] // self.world

    def bounds(self, rank: int) -> tuple[int, int]:
        """The slots [start, stop) of every row that `rank` holds."""
        return rank * self.width, (rank + 1) * self.width

    def local(self, name: str, rank: int) -> torch.Tensor:
        """`rank`'s slice [R, P/world] of the field `name` (input_ids, position_ids, targets, ...)."""
        start, stop = self.bounds(rank)
        return getattr(self, name)[:, start:stop]

    def layout(
        self, group: dist.ProcessGroup | None, attention: str, runs: tuple[torch.Tensor, int] | None = None
    ) -> RowLayout:
        """The whole rows' layout every rank's attention reads (`RowLayout`; `runs`: their varlen
        runs where the host planned them, `ShardPlan.runs`)."""
        return RowLayout(group, self.world, attention, self.position_ids, self.sequence_ids, runs)


def shard_rows(
    input_ids: torch.Tensor, position_ids: torch.Tensor, sequence_ids: torch.Tensor | None, world: int
) -> ShardedRows:
    """`input_ids` [R, C] (packed rows: `position_ids` restart at each sequence; `sequence_ids` -1
    on a row's unused tail, None: one sequence per row) split over `world` ranks (`ShardedRows`)."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    R, C = input_ids.shape
    if sequence_ids is None:
        sequence_ids = torch.zeros_like(input_ids)
    pad = -C % world
    if pad:
        input_ids = torch.nn.functional.pad(input_ids, (0, pad))
        position_ids = torch.nn.functional.pad(position_ids, (0, pad))
        sequence_ids = torch.nn.functional.pad(sequence_ids, (0, pad), value=-1)
    # The shift on the whole row: slot p predicts slot p + 1's token, across the slices' seams.
    targets = torch.nn.functional.pad(input_ids[:, 1:], (0, 1))
    same = sequence_ids[:, :-1] == sequence_ids[:, 1:]
    scored = torch.nn.functional.pad(same & (sequence_ids[:, :-1] >= 0), (0, 1))
    return ShardedRows(input_ids, position_ids, sequence_ids, targets, scored, world, C)


@dataclass(frozen=True)
class ShardPlan:
    """One rank's part of a micro-batch's packed rows [R, C] split over `world` ranks (padded to P
    slots, `shard_rows`), planned on the host with the packing (`plan_shard`) so that no forward
    reads the device for it; `to` moves it with the packing."""

    slots: torch.Tensor  # [B, T]: each scored token's flat slot in the rank's slice [R, P/world] (0 if not its own)
    targets: torch.Tensor  # [B, T]: its flat slot in the whole padded rows [R, P] (`ShardedRows.targets`)
    mine: torch.Tensor  # [K']: the flat indices into [B, T] of the scored tokens in the rank's slots
    cu_seqlens: torch.Tensor  # int32: the whole padded rows' varlen runs (every sequence, each row's tail and pad)
    max_seqlen: int  # the longest of them

    @property
    def runs(self) -> tuple[torch.Tensor, int]:
        """(cu_seqlens, max_seqlen): `RowLayout.runs`."""
        return self.cu_seqlens, self.max_seqlen

    def to(self, device: torch.device) -> ShardPlan:
        """On `device` (`packing.to_device`)."""
        slots, targets, mine, cu = (
            to_device(t, device) for t in (self.slots, self.targets, self.mine, self.cu_seqlens)
        )
        return ShardPlan(slots, targets, mine, cu, self.max_seqlen)


def plan_shard(packing: PackedRows, world: int, rank: int) -> ShardPlan:
    """`rank`'s `ShardPlan` of the host `packing` split over `world` ranks."""
    R, C = packing.position_ids.shape
    P = C + (-C % world)
    width = P // world
    row, column = packing.positions // C, packing.positions % C
    start = rank * width
    here = (column >= start) & (column < start + width)
    slots = torch.where(here, row * width + column - start, 0)
    targets = row * P + column
    mine = packing.scored[here.reshape(-1)[packing.scored]]
    return ShardPlan(slots, targets, mine, *padded_runs(packing.cu_seqlens, R, C, P))


def padded_runs(cu_seqlens: torch.Tensor, rows: int, width: int, padded: int) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32, longest run) of packed rows of `width` slots, whose runs are `cu_seqlens`
    (`PackedRows.cu_seqlens`), once each row is padded to `padded` slots: each row's offsets kept,
    its pad a run of its own. On the host."""
    bounds = cu_seqlens.long()
    moved = bounds // width * padded + bounds % width
    pads = torch.arange(rows, device=bounds.device) * padded + width if padded > width else moved[:0]
    out = torch.cat([moved, pads]).unique(sorted=True)
    return out.to(torch.int32), int((out[1:] - out[:-1]).max()) if len(out) > 1 else 0
