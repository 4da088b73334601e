"""Training FLOPs of a decoder model over a batch of sequences, counted two ways: the formula
written once, for the learner's step metrics and every GPU benchmark's MFU.

- dense: 2·N per token forward, 4·N backward, so 6·N·tokens for a training pass (N: the model's
  parameters, as counted by the caller; the house's figures count every parameter).
- with attention: plus the attention scores and their weighted sum, which no parameter counts.
  Per layer and query head a sequence of s tokens costs QKᵀ 2·s²·d and AV 2·s²·d forward, twice
  that backward: 12·L·H·d·s² for a training pass (L layers, H query heads, d the head size), which
  is 12·L·H·d·s per token, prime-rl's `src/prime_rl/trainer/perf.py` term.

Two choices, both written here so figures compare:
- The causal half is counted (not halved), as prime-rl, torchtitan and PaLM's MFU count it: a
  causal kernel skips about half of those products, so "with attention" credits it up to half of
  the attention term it never ran. The convention keeps our rows comparable with theirs.
- Attention is per sequence, Σ s_i², never the packed row's width squared: prime-rl multiplies by
  its configured sequence length, which for packed rows counts attention across sequences that
  packing exists to avoid. Right-padded rows count their real tokens only, like packed ones.
Recomputation (activation checkpointing, flash attention's backward) is not counted: model FLOPs,
not hardware FLOPs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

PASS_FACTOR = {True: 3, False: 1}  # forward + backward (2x forward) vs forward only


@dataclass(frozen=True)
class FlopsShape:
    """What the count reads of a decoder model."""

    parameters: int  # N
    layers: int
    heads: int  # query heads
    head_dim: int

    @classmethod
    def of_config(cls, config: Any, parameters: int) -> FlopsShape:
        """From a Hugging Face config (its `text_config` where it has one) and a parameter count."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = int(text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
        return cls(parameters, int(text.num_hidden_layers), heads, head_dim)

    @classmethod
    def of_model(cls, model: Any) -> FlopsShape:
        """From a Hugging Face model (also under a DeepSpeed or PEFT wrapper): its config, and every
        parameter counted whole (FSDP2's DTensors count their full size; ZeRO-3's partitioned
        parameters their `ds_numel`)."""
        inner = getattr(model, "module", model)
        count = sum(int(getattr(p, "ds_numel", p.numel())) for p in inner.parameters())
        return cls.of_config(inner.config, count)


class StepFlops(NamedTuple):
    """FLOPs of a batch's passes, dense (6·N·tokens for training) and with attention added."""

    dense: float
    with_attention: float

    @property
    def attention(self) -> float:
        return self.with_attention - self.dense


def flops_of_sums(shape: FlopsShape, tokens: float, squares: float, backward: bool = True) -> StepFlops:
    """`batch_flops` from the sums it reads: the real tokens Σ s_i and Σ s_i² over the sequences."""
    factor = PASS_FACTOR[backward]
    dense = 2 * factor * shape.parameters * tokens
    attention = 4 * factor * shape.layers * shape.heads * shape.head_dim * squares
    return StepFlops(float(dense), float(dense + attention))


def batch_flops(shape: FlopsShape, lengths: Sequence[int], backward: bool = True) -> StepFlops:
    """FLOPs of one training pass (forward and backward; `backward=False`: forward only) over
    sequences of `lengths` real tokens each: dense 6·N·Σ s_i, and with attention
    6·N·Σ s_i + 12·L·H·d·Σ s_i² (a forward only: a third of each)."""
    return flops_of_sums(shape, sum(lengths), sum(s * s for s in lengths), backward)


def utilization(flops: StepFlops, seconds: float, peak_flops: float) -> StepFlops:
    """MFU both ways: each count over `seconds` as a fraction of the device's `peak_flops`."""
    return StepFlops(flops.dense / seconds / peak_flops, flops.with_attention / seconds / peak_flops)
