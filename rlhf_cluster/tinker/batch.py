"""Tinker datums through a causal LM: micro-batches, the learner's log-probs of the targets, and the
loss metrics of several micro-batches combined.

Tinker's positions are not shifted: input position i predicts `target_tokens[i]`. Rows are
right-padded and run without an attention mask: attention is causal, so a real token never sees
the padding after it. The output layer runs only at the real positions (`scored_positions`), and
each log-prob is a float32 log-softmax of the logits there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rlhf_cluster.experience.records import token_budget_batches
from rlhf_cluster.models.chunked_logprobs import scored_positions
from rlhf_cluster.tinker.records import Datum


def micro_batches(lengths: Sequence[int], micro_tokens: int) -> list[list[int]]:
    """Datum indices in order, grouped so that each group's padded size (rows x longest row) stays
    within `micro_tokens`; a datum longer than that is a group of its own (the learner's rule)."""
    return token_budget_batches(list(lengths), micro_tokens)


def check_datums(datums: Sequence[Datum], vocab_size: int) -> None:
    """Refuse what the model cannot run: an empty datum, targets of another length than the tokens,
    or a token or target outside the vocabulary (a ValueError naming the datum)."""
    for i, d in enumerate(datums):
        if d.length == 0:
            raise ValueError(f"datum {i} has no tokens")
        if "target_tokens" not in d.inputs:
            raise ValueError(f"datum {i} lacks loss_fn_inputs 'target_tokens'")
        targets = np.asarray(d.inputs["target_tokens"])
        if targets.shape != (d.length,):
            raise ValueError(f"datum {i}: target_tokens has shape {list(targets.shape)}, want [{d.length}]")
        for what, ids in (("tokens", np.asarray(d.tokens)), ("target_tokens", targets)):
            if ids.min() < 0 or ids.max() >= vocab_size:
                raise ValueError(f"datum {i}: {what} outside the vocabulary [0, {vocab_size})")


def datum_inputs(datum: Datum, device: torch.device) -> dict[str, torch.Tensor]:
    """A datum's loss inputs as tensors on `device`: `target_tokens` int64, the rest float32."""
    out = {}
    for key, value in datum.inputs.items():
        dtype = torch.int64 if key == "target_tokens" else torch.float32
        out[key] = torch.as_tensor(np.asarray(value), dtype=dtype, device=device)
    return out


def target_logprobs(model, datums: Sequence[Datum], device: torch.device) -> list[torch.Tensor]:
    """float32 log-probs [N_i] of each datum's `target_tokens` under `model`, from one forward of the
    right-padded rows (with the graph when grad is enabled)."""
    lengths = [d.length for d in datums]
    B, L = len(datums), max(lengths)
    ids = torch.zeros(B, L, dtype=torch.int64)
    targets = torch.zeros(B, L, dtype=torch.int64)
    for row, d in enumerate(datums):
        ids[row, : d.length] = torch.as_tensor(np.asarray(d.tokens), dtype=torch.int64)
        targets[row, : d.length] = torch.as_tensor(np.asarray(d.inputs["target_tokens"]), dtype=torch.int64)
    real = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    ids, targets = ids.to(device), targets.to(device)
    positions = torch.arange(B * L, device=device).view(B, L)
    only = real.reshape(-1).nonzero().squeeze(1).to(device)
    with scored_positions(model, positions, targets, only=only) as scored:
        logprobs, _ = scored.read(model(input_ids=ids, use_cache=False).logits)
    return [logprobs[row, :n] for row, n in enumerate(lengths)]


def combine_metrics(parts: Sequence[tuple[dict[str, float], int]]) -> dict[str, float]:
    """The metrics of several micro-batches (each with its datum count) as one batch's, by the
    reduction each name carries: `:sum` added, `:min`/`:max` taken, anything else (`:mean`)
    averaged weighted by datums, as the SDK combines chunked results."""
    out: dict[str, float] = {}
    for key in parts[0][0] if parts else {}:
        values = [m[key] for m, _ in parts if key in m]
        weights = [n for m, n in parts if key in m]
        reduction = key.rpartition(":")[2]
        if reduction == "sum":
            out[key] = float(sum(values))
        elif reduction == "min":
            out[key] = float(min(values))
        elif reduction == "max":
            out[key] = float(max(values))
        else:
            out[key] = float(np.average(values, weights=weights)) if sum(weights) else float(np.mean(values))
    return out
