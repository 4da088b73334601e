"""Learner memory by plan: from the model's shape and the token budget, an estimate of a rank's
peak device memory, and the choice of activation checkpointing and micro-batch tokens that keeps
it within `learner.memory_fraction` of the device (issue 54).

The estimate, per rank, for a decoder of `layers` blocks of width `hidden` and MLP `intermediate`:
- states: fp32 master weights, gradients and AdamW's two moments, 16 bytes per parameter, sharded
  over the ranks (with LoRA the frozen weights alone, 4 bytes); where the plan keeps them (one
  rank, where it fits) also the gathered bf16 weights, 2 bytes per parameter: a layer is then not
  resharded between its forward and its backward, one cast and gather per micro-batch, not two;
- activations: per token per layer, what autograd saves in a Qwen2/Llama block at bf16 (the
  projections' inputs and outputs, 10 x hidden; the gated MLP's four intermediates, 4 x
  intermediate; at 2 bytes) plus the RMSNorms' float32 inputs (8 x hidden bytes). With
  checkpointing only each layer's input is kept (2 x hidden bytes), plus one layer recomputed;
- the chunked log-prob path: two float32 [chunk, vocab] buffers, the chunk's bf16 logits and the
  output layer's float32 gradient;
- 10% for the allocator's slack and the all-gathered bf16 layers in flight.
With `learner.sequence_parallel` N a micro-batch's rows are split along their length over N ranks
(`rlhf_cluster.models.sequence_parallel`): a rank's activations and scored tokens are 1/N of the
micro-batch's (the all-to-all's buffers are one layer's q, k and v of its own slots), so the plan's
token budgets are N times one rank's.
Checked against one H100 (2026-11-26, 10,335 real tokens in one micro-batch, before the one-rank
learner kept gathered weights, so without those 2 bytes per parameter): Qwen2.5-0.5B estimated
25.6 GiB, measured 24.0; Qwen2.5-1.5B estimated 61 GiB, measured 61.5; with checkpointing 1.5B
estimated 29 GiB, measured 24.9. `python -m benchmarks.gpu.learner` prints estimate and peak side by side.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_cluster.models.moe import moe_info

# Tokens per micro-batch on CUDA when neither the config nor the plan sets fewer: an RL batch of
# 16 sequences of ~1k tokens in one pass (issue 35).
CUDA_MICRO_BATCH_TOKENS = 16384
# The smallest micro-batch the plan picks before it turns checkpointing on: below it the GEMMs are
# too short to keep a GPU busy.
MIN_PLANNED_TOKENS = 8192
SLACK = 1.10
GIB = 2**30

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelShape:
    """What the estimate reads of a decoder model."""

    parameters: int
    hidden: int
    layers: int
    intermediate: int
    vocab: int

    @classmethod
    def of_folder(cls, model_path: str | Path) -> ModelShape:
        """From a Hugging Face folder's config.json (the parameter count from the shapes alone)."""
        config = json.loads((Path(model_path) / "config.json").read_text())
        text = config.get("text_config", config)
        hidden, layers = int(text["hidden_size"]), int(text["num_hidden_layers"])
        intermediate, vocab = int(text.get("intermediate_size", 4 * hidden)), int(text["vocab_size"])
        heads = int(text.get("num_attention_heads", max(1, hidden // 64)))
        kv_heads = int(text.get("num_key_value_heads", heads))
        head_dim = int(text.get("head_dim") or hidden // heads)
        attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
        mlps = layers * 3 * hidden * intermediate
        info = moe_info(config)
        if info is not None:  # a mixture of experts: every expert's weights held, top_k of them run per token
            width = int(text.get("moe_intermediate_size") or intermediate)
            shared = int(text.get("shared_expert_intermediate_size") or 0)
            moe = info.num_experts * (3 * hidden * width + hidden) + 3 * hidden * shared + (hidden if shared else 0)
            mlps += len(info.layers) * (moe - 3 * hidden * intermediate)
            intermediate = info.top_k * width + shared  # what the activations hold per token
        embeddings = vocab * hidden * (1 if text.get("tie_word_embeddings", config.get("tie_word_embeddings")) else 2)
        parameters = layers * (attention + 2 * hidden) + mlps + embeddings + hidden
        return cls(parameters, hidden, layers, intermediate, vocab)


@dataclass(frozen=True)
class MemoryEstimate:
    """A rank's estimated peak device memory for one micro-batch of `tokens`, in bytes."""

    tokens: int
    checkpointing: bool
    states: int
    activations: int
    logprobs: int
    sequence_parallel: int = 1  # ranks the micro-batch's rows are split over

    @property
    def total(self) -> int:
        return int((self.states + self.activations + self.logprobs) * SLACK)

    def describe(self) -> str:
        return (
            f"{self.total / GIB:.1f} GiB per rank (states {self.states / GIB:.1f}, activations "
            f"{self.activations / GIB:.1f} for {self.tokens} tokens"
            f"{f' split over {self.sequence_parallel} ranks' if self.sequence_parallel > 1 else ''}"
            f"{' with checkpointing' if self.checkpointing else ''}, "
            f"log-prob path {self.logprobs / GIB:.1f}, +{SLACK - 1:.0%} slack)"
        )


def estimate(
    shape: ModelShape,
    tokens: int,
    world_size: int = 1,
    checkpointing: bool = False,
    frozen_base: bool = False,
    keep_gathered: bool = False,
    sequence_parallel: int = 1,
) -> MemoryEstimate:
    """The estimate of the module docstring for a micro-batch of `tokens` tokens (`frozen_base`:
    LoRA, whose frozen weights have no gradient or optimizer state; the adapters' are left out;
    `keep_gathered`: every layer's gathered bf16 weights held from its forward to its backward;
    `sequence_parallel`: ranks the rows are split over, each holding 1/N of the tokens)."""
    states = (4 if frozen_base else 16) * shape.parameters // world_size
    if keep_gathered:
        states += 2 * shape.parameters
    whole, tokens = tokens, -(-tokens // sequence_parallel)  # this rank's slots
    per_token_layer = 2 * (10 * shape.hidden + 4 * shape.intermediate) + 8 * shape.hidden
    if checkpointing:
        activations = tokens * (shape.layers * 2 * shape.hidden + per_token_layer)
    else:
        activations = tokens * shape.layers * per_token_layer
    chunk = min(tokens, 512)
    logprobs = (2 * 4 + 2) * chunk * shape.vocab + shape.vocab * shape.hidden * 4
    return MemoryEstimate(whole, checkpointing, states, activations, logprobs, sequence_parallel)


@dataclass(frozen=True)
class MemoryPlan:
    """What the learner runs with: checkpointing on or off, tokens per micro-batch (None: a whole
    mini-batch), whether a layer keeps its gathered weights from forward to backward (one rank
    only), the estimate it was chosen by (None on the CPU) and why."""

    checkpointing: bool
    micro_batch_tokens: int | None
    estimate: MemoryEstimate | None
    reason: str
    keep_gathered: bool = False


def device_memory_bytes(device: torch.device) -> int | None:
    """The device's total memory (None for the CPU, where the plan does not apply)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def plan_for_folder(
    lc, model_path: str | Path, world_size: int, device: torch.device, log_it: bool, longest: int | None = None
) -> MemoryPlan:
    """`plan_memory` for the model in `model_path` on `device` (its config.json read where there is
    one), logged where `log_it` (one rank)."""
    shape = ModelShape.of_folder(model_path) if (Path(model_path) / "config.json").is_file() else None
    plan = plan_memory(lc, shape, world_size, device_memory_bytes(device), longest)
    if plan.estimate is not None and log_it:
        log.info(
            "learner memory plan: checkpointing %s, %s tokens per micro-batch, %s (%s)",
            "on" if plan.checkpointing else "off",
            plan.micro_batch_tokens,
            plan.estimate.describe(),
            plan.reason,
        )
    return plan


def plan_memory(
    lc, shape: ModelShape | None, world_size: int, device_bytes: int | None, longest: int | None = None
) -> MemoryPlan:
    """The learner's plan: the config's settings where it sets them; else on a GPU (`device_bytes`)
    the first of these whose estimate fits `lc.memory_fraction` of the device: no checkpointing at
    the largest budget from 16k down to MIN_PLANNED_TOKENS (gathered weights kept, then not), then
    checkpointing likewise down to 1,024 tokens. Gathered weights are kept only at one rank. On the
    CPU: the config's settings, a whole mini-batch by default, gathered weights kept at one rank.
    With `lc.sequence_parallel` N every planned budget is N times as many tokens (each rank runs
    1/N of them), a budget the config sets is the micro-batch's, not one rank's. A row longer than
    the budget is a micro-batch of its own (`token_budget_micro_batches`), so each estimate counts
    at least `longest` tokens, the longest row the job can make (`generation.max_model_len`): on one
    H200 a 0.5B step at 32k tokens per sequence peaked 14 GiB above its 16k-token plan (2026-11-28)."""
    fixed_tokens, fixed_ckpt = lc.max_tokens_per_micro_batch, lc.gradient_checkpointing
    n = lc.sequence_parallel
    one_rank = world_size == 1
    if device_bytes is None or shape is None:
        return MemoryPlan(bool(fixed_ckpt), fixed_tokens, None, "CPU: the config's settings", one_rank)
    limit = int(device_bytes * lc.memory_fraction)
    share = f"{lc.memory_fraction:.0%} of {device_bytes / GIB:.0f} GiB"
    start = fixed_tokens or CUDA_MICRO_BATCH_TOKENS * n
    checkpointing = [False, True] if fixed_ckpt is None else [fixed_ckpt]
    candidates = [
        (ckpt, keep, t)
        for ckpt in checkpointing
        for keep in ([True, False] if one_rank else [False])
        for t in _budgets(start, (1024 if ckpt else MIN_PLANNED_TOKENS) * n, fixed_tokens)
    ]
    floor = longest or 0
    for ckpt, keep, t in candidates:
        chosen = estimate(shape, max(t, floor), world_size, ckpt, lc.lora.enabled, keep, n)
        if chosen.total <= limit:
            return MemoryPlan(ckpt, t, chosen, f"fits {share}", keep)
    ckpt, keep, t = candidates[-1]
    last = estimate(shape, max(t, floor), world_size, ckpt, lc.lora.enabled, keep, n)
    return MemoryPlan(ckpt, t, last, f"does not fit {share}: smallest plan", keep)


def _budgets(start: int, floor: int, fixed: int | None) -> list[int]:
    """`start`, halved down to `floor` (only `fixed` where the config fixes the budget)."""
    if fixed is not None:
        return [fixed]
    out = [start]
    while out[-1] // 2 >= floor:
        out.append(out[-1] // 2)
    return out
