"""Sequence packing: a batch's real tokens only, rows of sequences one after another, and
micro-batches and rank shares cut by a token budget.

An RL batch is right-padded to its longest sequence, so a third or more of its positions are
padding (issue 35: 10,335 real tokens in 15,744 positions). Packed, sequences sit one after another
in rows whose position ids restart at 0 for each sequence; Hugging Face models read that as packed
sequences (per-sequence `cu_seqlens` for varlen flash-attention, and the block-diagonal causal mask
given here for SDPA and eager attention), so no sequence attends to another. With flash-attention
or PyTorch's varlen kernels (`varlen_attention`, given the `cu_seqlens` planned here) every sequence
shares one row and the forward costs the real tokens only; SDPA and eager attention
cost a row's width squared, so their rows are as wide as the longest sequence and fewer than the
padded batch's. Log-probs come back in the same [rows, response] frame as the padded path's.
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rlhf_cluster.models.varlen_attention import VARLEN

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask


@dataclass
class PackedRows:
    """Where every real token of a right-padded batch [B, L] sits once packed into R rows of C slots,
    and where each response token is scored. Built on the host (`plan_packing`), so packing never
    reads the device; `to` moves it once per micro-batch, before any of the step's compute."""

    gather: torch.Tensor  # [R, C]: the flat index (b * L + p) in the padded batch of each slot's token
    position_ids: torch.Tensor  # [R, C]: 0, 1, ... restarting at each sequence (0 on a row's tail)
    sequence_ids: torch.Tensor  # [R, C]: the padded row each slot's token came from; -1 on a row's tail
    positions: torch.Tensor  # [B, T]: the flat slot (r * C + c) whose output predicts response token t
    # [K]: the flat indices (b * T + t) into [B, T] of the response tokens that exist (t < the
    # sequence's response length): the only ones scored, the rest of [B, T] is padding.
    scored: torch.Tensor
    # int32 [N+1]: where each run of slots that attend among themselves starts in the flat [R * C]
    # slots (every sequence, and each row's tail as its own), then R * C: varlen kernels' cu_seqlens.
    cu_seqlens: torch.Tensor
    max_seqlen: int  # the longest of those runs

    def to(self, device: torch.device) -> PackedRows:
        """On `device` (`to_device`)."""
        gather, position_ids, sequence_ids, positions, scored, cu_seqlens = (
            to_device(t, device)
            for t in (self.gather, self.position_ids, self.sequence_ids, self.positions, self.scored, self.cu_seqlens)
        )
        return PackedRows(gather, position_ids, sequence_ids, positions, scored, cu_seqlens, self.max_seqlen)

    def varlen_kwargs(self) -> dict[str, torch.Tensor | int]:
        """The sequences as flash-attention's keyword arguments (the names transformers passes down
        to every attention layer), read by `varlen_attention` without reading the device."""
        cu, longest = self.cu_seqlens, self.max_seqlen
        return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}

    def input_ids(self, padded_ids: torch.Tensor) -> torch.Tensor:
        """The packed [R, C] token ids of the padded batch `padded_ids` [B, L]."""
        return padded_ids.reshape(-1)[self.gather]

    def targets(self, packed_ids: torch.Tensor) -> torch.Tensor:
        """[B, T]: the token each scored slot predicts, the next slot's (garbage past a response's
        end, masked by the caller)."""
        return packed_ids.reshape(-1)[self.positions + 1]

    def attention_mask(self, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor | BlockMask | None:
        """Causal within each sequence, nothing across sequences: a document mask for FlexAttention
        (`document_block_mask`), a ready 4D mask for SDPA and eager attention (`prepared_mask`);
        None for flash-attention, whose varlen kernels take the sequences from the position ids, and
        for `varlen`, which takes them from `varlen_kwargs`."""
        if attn_implementation.startswith("flash") or attn_implementation == VARLEN:
            return None
        if attn_implementation == "flex_attention":
            return document_block_mask(self.sequence_ids)
        same_sequence = self.sequence_ids[:, :, None] == self.sequence_ids[:, None, :]
        return prepared_mask(same_sequence, attn_implementation, dtype)


def document_block_mask(sequence_ids: torch.Tensor) -> BlockMask:
    """FlexAttention's block-sparse mask for packed rows [R, C]: each slot attends causally within
    its own sequence (a row's tail, -1, to itself). Blocks where no sequence meets itself are
    skipped, so attention costs about the sum of the sequences' squares, not the row's."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_sequence_causal(b, h, q, kv):
        return (sequence_ids[b, q] == sequence_ids[b, kv]) & (q >= kv)

    R, C = sequence_ids.shape
    return create_block_mask(same_sequence_causal, B=R, H=None, Q_LEN=C, KV_LEN=C, device=sequence_ids.device)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to CUDA from pinned memory, a copy the host does not wait for."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def prepared_mask(allowed: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor | BlockMask:
    """`allowed` [B, S, S] (query, key) and causality as the ready 4D [B, 1, S, S] mask a Hugging Face
    model uses as given (boolean for SDPA, additive for eager attention, a BlockMask for
    FlexAttention): the model then builds none
    itself, and its own mask building reads the device (whether the mask is all ones, whether the
    position ids restart)."""
    S = allowed.shape[-1]
    index = torch.arange(S, device=allowed.device)
    allowed = allowed & (index[None, :] <= index[:, None])
    if attn_implementation == "sdpa":
        return allowed[:, None]
    if attn_implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        B = allowed.shape[0]
        return create_block_mask(
            lambda b, h, q, kv: allowed[b, q, kv], B=B, H=None, Q_LEN=S, KV_LEN=S, device=allowed.device
        )
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min
    )[:, None]


def packing_pays(packing: PackedRows, padded_slots: int) -> bool:
    """Whether the packed rows hold fewer slots than the `padded_slots` of the right-padded rows they
    replace. When they do not (sequences of equal length, none of which fit together), the padded
    rows run as they are: packing would only add its gather (the CPU demo's case: no two of its
    9-12-token sequences share a 12-slot row; packed anyway, its learner step measured 3% slower)."""
    return packing.gather.numel() < padded_slots


def one_row(attn_implementation: str) -> bool:
    """Whether packed sequences share one row under `attn_implementation`: flash-attention's and
    PyTorch's varlen kernels cost the real tokens, and FlexAttention's document mask skips the
    blocks between sequences."""
    return attn_implementation.startswith("flash") or attn_implementation in ("flex_attention", VARLEN)


def row_tokens_for(attn_implementation: str, lengths: list[int]) -> int | None:
    """Slots per packed row: unbounded (one row) where the attention costs each sequence its own
    length (`one_row`: flash-attention, varlen, FlexAttention); the
    longest sequence otherwise, since SDPA and eager attention cost a row's slots
    squared: rows no wider than the padded batch's, and fewer of them (measured: one row of every
    sequence ran 2x slower than padding at the CPU demo's shape)."""
    return None if one_row(attn_implementation) else max(lengths, default=1)


def plan_packing(
    lengths: list[int], prompt_lengths: list[int], padded_len: int, response_len: int, row_tokens: int | None = None
) -> PackedRows:
    """Sequences of `lengths` real tokens (rows of a batch right-padded to `padded_len`) packed
    best-fit, longest first, into rows of at most `row_tokens` slots (None: one row of all of
    them); on the host, deterministic."""
    n = len(lengths)
    capacity = sum(lengths) if row_tokens is None else max(row_tokens, max(lengths, default=1))
    # Best-fit decreasing: each sequence, longest first, to the row with the least room that holds it.
    rooms: list[tuple[int, int]] = []  # (room left, row), ascending
    row_of, offset_of = [0] * n, [0] * n
    filled: list[int] = []  # slots used, per row
    for i in sorted(range(n), key=lambda i: (-lengths[i], i)):
        k = bisect.bisect_left(rooms, (lengths[i], -1))
        if k == len(rooms):
            row, used = len(filled), 0
            filled.append(0)
        else:
            row = rooms.pop(k)[1]
            used = filled[row]
        row_of[i], offset_of[i] = row, used
        filled[row] = used + lengths[i]
        if capacity > filled[row]:
            bisect.insort(rooms, (capacity - filled[row], row))
    width = max(filled, default=1)
    lengths_t = torch.tensor(lengths, dtype=torch.long)
    first_slot = torch.tensor(row_of, dtype=torch.long) * width + torch.tensor(offset_of, dtype=torch.long)
    sequence = torch.repeat_interleave(torch.arange(n), lengths_t)  # every real token's sequence
    within = torch.arange(int(lengths_t.sum())) - (torch.cumsum(lengths_t, 0) - lengths_t)[sequence]
    slots = first_slot[sequence] + within
    gather = torch.zeros(len(filled) * width, dtype=torch.long)
    position_ids = torch.zeros(len(filled) * width, dtype=torch.long)
    sequence_ids = torch.full((len(filled) * width,), -1, dtype=torch.long)
    gather[slots] = sequence * padded_len + within
    position_ids[slots] = within
    sequence_ids[slots] = sequence
    # Response token t of a sequence is predicted at its position prompt_len - 1 + t; positions past
    # its end are clamped into the sequence (garbage, masked) so they never read another one.
    steps = torch.arange(response_len)
    last = (lengths_t - 2).clamp(min=0)
    scored = torch.minimum(torch.tensor(prompt_lengths, dtype=torch.long)[:, None] - 1 + steps[None, :], last[:, None])
    positions = (first_slot[:, None] + scored.clamp(min=0)).clamp(max=gather.numel() - 2)
    responses = (lengths_t - torch.tensor(prompt_lengths, dtype=torch.long)).clamp(min=0, max=response_len)
    exists = (steps[None, :] < responses[:, None]).reshape(-1).nonzero().squeeze(1)
    shape = (len(filled), width)
    cu_seqlens, max_seqlen = run_bounds(first_slot, lengths_t, len(filled), width)
    planes = (gather.view(shape), position_ids.view(shape), sequence_ids.view(shape))
    return PackedRows(*planes, positions, exists, cu_seqlens, max_seqlen)


def run_bounds(first_slot: torch.Tensor, lengths: torch.Tensor, rows: int, width: int) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32, longest run) of `rows` packed rows of `width` slots whose sequences start at
    the flat slots `first_slot` and run `lengths`: every sequence is a run, and so is a row's tail
    (slots no sequence holds: garbage nobody scores, kept away from the sequences)."""
    bounds = torch.cat([first_slot, first_slot + lengths, torch.arange(rows + 1) * width]).unique(sorted=True)
    return bounds.to(torch.int32), int((bounds[1:] - bounds[:-1]).max()) if len(bounds) > 1 else 0


def pack_rows(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_lengths: torch.Tensor,
    response_len: int,
    attn_implementation: str = "flash_attention_2",
) -> PackedRows:
    """`plan_packing` of right-padded rows [B, L] whose attention mask marks each row's real prefix,
    in rows sized for `attn_implementation` (`row_tokens_for`), on their device. It reads the
    lengths back from the device: a learner step plans from its host copy instead."""
    lengths = attention_mask.sum(1).tolist()
    return plan_packing(
        lengths, prompt_lengths.tolist(), input_ids.shape[1], response_len, row_tokens_for(attn_implementation, lengths)
    ).to(input_ids.device)


def balanced_parts(lengths: list[int], parts: int) -> list[list[int]]:
    """Indices of `lengths` dealt into `parts` lists of near-equal sums (longest first, each to the
    lightest part so far); each part's indices in ascending order. Deterministic."""
    heap = [(0, p) for p in range(parts)]
    out: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        load, p = heapq.heappop(heap)
        out[p].append(i)
        heapq.heappush(heap, (load + lengths[i], p))
    return [sorted(part) for part in out]


def balanced_shares(lengths: list[int], world: int) -> list[list[int]]:
    """Indices of `lengths` dealt to `world` ranks longest first in snake order (0, 1, ..., w-1,
    w-1, ..., 0, ...): every rank gets the same number of rows (+-1), so each can split its share
    into the same mini-batches, and near-equal tokens. Each share in ascending order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    shares: list[list[int]] = [[] for _ in range(world)]
    for k, i in enumerate(order):
        lap, pos = divmod(k, world)
        shares[pos if lap % 2 == 0 else world - 1 - pos].append(i)
    return [sorted(share) for share in shares]


def token_budget_micro_batches(lengths: list[int], budget: int | None) -> list[list[int]]:
    """Row indices cut into the fewest balanced micro-batches of at most `budget` tokens each (a row
    longer than the budget goes alone); None: one micro-batch of every row."""
    if budget is None or not lengths:
        return [list(range(len(lengths)))]
    parts = max(1, -(-sum(lengths) // budget))
    while True:
        out = [part for part in balanced_parts(lengths, parts) if part]
        if all(len(part) == 1 or sum(lengths[i] for i in part) <= budget for part in out):
            return out
        parts += 1
