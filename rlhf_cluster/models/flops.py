"""Training FLOPs of a decoder model over a batch of sequences, counted two ways: the formula
written once, for the learner's step metrics and every GPU benchmark's MFU.

- dense: 2·N per token forward, 4·N backward, so 6·N·tokens for a training pass (N: the
  parameters a token runs through; the house's figures count every parameter of a dense model,
  the embedding included).
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

A mixture of experts counts its active parameters (`parameter_counts`): a token runs top_k of a
layer's E routed experts, so their tensors (every parameter under a module named `experts`: the
stacked `gate_up_proj` / `down_proj` of transformers 5, or one module per expert) count k/E of
their size; the router (`mlp.gate`, E·H, which every token runs) and a shared expert (Qwen2-MoE's
`shared_expert`, DeepSeek's `shared_experts`) count whole. Qwen3-30B-A3B's 30.5B parameters count
as its 3.3B active ones, as the model card and the MoE MFU figures elsewhere count them; counting
every expert would credit 9x the products a step runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from rlhf_cluster.models.moe import moe_info

PASS_FACTOR = {True: 3, False: 1}  # forward + backward (2x forward) vs forward only


@dataclass(frozen=True)
class FlopsShape:
    """What the count reads of a decoder model."""

    parameters: int  # N: every parameter of a dense model, the active ones of an MoE
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
        """From a Hugging Face model (also under a DeepSpeed or PEFT wrapper): its config, and its
        parameters counted whole, an MoE's routed experts at top_k/E (`parameter_counts`)."""
        inner = getattr(model, "module", model)
        return cls.of_config(inner.config, parameter_counts(inner)[1])


def parameter_counts(model: Any) -> tuple[int, int]:
    """`(total, active)` parameters of a Hugging Face model (also under a DeepSpeed or PEFT
    wrapper; FSDP2's DTensors count their full size, ZeRO-3's partitioned parameters their
    `ds_numel`): active is total for a dense model; for an MoE, the routed experts count top_k/E."""
    inner = getattr(model, "module", model)
    sizes = ((name, int(getattr(p, "ds_numel", p.numel()))) for name, p in inner.named_parameters())
    return active_parameters(sizes, moe_info(inner.config))


def active_parameters(sizes: Iterable[tuple[str, int]], moe: Any) -> tuple[int, int]:
    """`(total, active)` of named parameter sizes, given the model's `MoeShape` (None: dense). A
    routed expert's tensor is one with a module named `experts` in its name (`mlp.experts.down_proj`,
    `mlp.experts.3.w1.weight`; not `shared_expert(s)` nor the router `mlp.gate`)."""
    total = routed = 0
    for name, size in sizes:
        total += size
        if "experts" in name.split("."):
            routed += size
    if moe is None or routed == 0:
        return total, total
    return total, total - routed + routed * moe.top_k // moe.num_experts


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
