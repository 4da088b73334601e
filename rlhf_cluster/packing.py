"""Sequence packing: a batch's real tokens only, one row after another, and micro-batches and rank
shares cut by a token budget.

An RL batch is right-padded to its longest sequence, so a third or more of its positions are
padding (issue 35: 10,335 real tokens in 15,744 positions). Packed, the rows are concatenated into
one sequence whose position ids restart at 0 for each row; Hugging Face models read that as a
packed batch (a block-diagonal causal mask for SDPA and eager attention, per-sequence `cu_seqlens`
for varlen flash-attention), so no row attends to another and the forward costs the real tokens
only. Log-probs come back in the same [rows, response] frame as the padded path's.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch


@dataclass
class PackedRows:
    """Rows of a right-padded batch as one packed sequence, and where each response token is scored."""

    input_ids: torch.Tensor  # [1, S]: every row's real tokens, one after another
    position_ids: torch.Tensor  # [1, S]: 0, 1, ... restarting at each row
    positions: torch.Tensor  # [rows, T]: the packed position whose output predicts response token t
    targets: torch.Tensor  # [rows, T]: the token it predicts (garbage past a response's end, masked by the caller)
    sequence_ids: torch.Tensor  # [S]: the row every packed token came from

    def attention_mask(self, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor | None:
        """Causal within each row, nothing across rows (`prepared_mask`); None for flash-attention,
        whose varlen kernels take the rows from the position ids."""
        if attn_implementation.startswith("flash"):
            return None
        same_row = self.sequence_ids[:, None] == self.sequence_ids[None, :]
        return prepared_mask(same_row[None], attn_implementation, dtype)


def prepared_mask(allowed: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """`allowed` [B, S, S] (query, key) and causality as the ready 4D [B, 1, S, S] mask a Hugging Face
    model uses as given (boolean for SDPA, additive for eager attention): the model then builds none
    itself, and its own mask building reads the device (whether the mask is all ones, whether the
    position ids restart)."""
    S = allowed.shape[-1]
    index = torch.arange(S, device=allowed.device)
    allowed = allowed & (index[None, :] <= index[:, None])
    if attn_implementation == "sdpa":
        return allowed[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lengths: torch.Tensor,
              response_len: int) -> PackedRows:
    """Pack right-padded rows [B, L] (the attention mask marks each row's real prefix)."""
    lengths = attention_mask.sum(1)
    keep = attention_mask.bool()
    packed = input_ids[keep][None, :]
    starts = torch.cumsum(lengths, 0) - lengths
    # Position ids: the index within its own row of every kept token.
    position_ids = (torch.arange(input_ids.shape[1], device=input_ids.device)[None, :].expand_as(input_ids))[keep][None, :]
    steps = torch.arange(response_len, device=input_ids.device)
    # Response token t of a row is predicted at its row's position prompt_len - 1 + t; positions
    # past the row's end are clamped into the row (garbage, masked) so they never read another row.
    within = torch.minimum(prompt_lengths.to(input_ids.device)[:, None] - 1 + steps[None, :], (lengths - 2)[:, None])
    positions = starts[:, None] + within
    sequence_ids = torch.repeat_interleave(torch.arange(len(lengths), device=input_ids.device), lengths)
    return PackedRows(packed, position_ids, positions, packed[0, positions + 1], sequence_ids)


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
