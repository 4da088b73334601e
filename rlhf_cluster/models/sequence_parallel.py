"""Sequence parallelism, Ulysses-style: one long packed row split along its length over the N ranks
of a process group, attention run on the whole row by an all-to-all of heads.

Every layer but attention works token by token, so each rank runs the model on its own contiguous
1/N of the row's slots (the row padded to a multiple of N, the tail masked). Attention needs every
earlier token: there q, k and v go through an all-to-all that turns "my slots, all heads" into "all
slots, heads/N" (DeepSpeed-Ulysses, arXiv:2309.14509), the model's own attention runs on the whole
row for those heads (causal within each packed sequence, the same masks as packing's), and a second
all-to-all turns the output back. Both all-to-alls are differentiable (each one's backward is the
same exchange of the gradients), so a rank's activations and attention scores are 1/N of the row's;
the weights' gradients of the N ranks add up to the whole row's.

The slices carry their global position ids (rotary embeddings stay right), and the next-token
targets are taken on the whole row before it is sliced: the last slot of a slice is scored against
the first token of the next slice. The attention is registered with transformers'
`AttentionInterface` (as `ATTENTION`_<the model's own attention>); it reads the row's layout from
the `sequence_parallel` keyword the model's forward passes down to it, so it also holds when
gradient checkpointing recomputes a layer in the backward. No mask is built by the model for it
(transformers builds none for an implementation it has no mask function for); the row's mask is
built by the layout, once per forward (`sequence_rows.RowLayout`), and the learner's varlen runs
and scored slots are planned on the host with its packing (`sequence_rows.ShardPlan`). A forward
without a layout is the plain model's (its own attention on what it is given, under the ready mask
the caller passes, as the packed and padded paths do).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from rlhf_cluster.models.chunked_logprobs import DEFAULT_CHUNK_TOKENS, scored_positions
from rlhf_cluster.models.sequence_rows import (  # noqa: F401  # re-exported: the rows' side of it
    RowLayout,
    ShardedRows,
    ShardPlan,
    padded_runs,
    plan_shard,
    shard_rows,
)

ATTENTION = "sequence_parallel"  # the prefix of the names the attention is registered under in transformers
# Flash-attention's keyword names for the sequences of a varlen call (`PackedRows.varlen_kwargs`).
VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def check_heads(config: Any, world: int) -> int:
    """How many times each key/value head is repeated so that `world` ranks can share them (1 where
    they divide evenly; GQA with fewer kv heads than ranks repeats them). Raises where the ranks
    cannot share the query heads evenly."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    if heads % world:
        raise ValueError(
            f"learner.sequence_parallel: {world} ranks must divide the model's attention heads evenly "
            f"(each rank attends with heads/{world} of them over the whole sequence); the model has {heads} "
            f"attention heads and {kv_heads} key-value heads"
        )
    return world // math.gcd(kv_heads, world)


# The attentions that take the whole rows' sequences without a dense [R, 1, P, P] mask: on CUDA
# SDPA would get one per rank (P^2 per row, ~1 GiB at 32k tokens, not 1/N, and off the flash kernel).
CUDA_ATTENTIONS = ("varlen", "flash_attention_2", "flex_attention")


def enable_sequence_parallel(model: torch.nn.Module, world: int, device: torch.device | None = None) -> str:
    """Switch `model` (a Hugging Face model) to the sequence-parallel attention, registered as
    `ATTENTION`_<its attention>; returns the attention it ran before, which the sharded forwards run
    on the whole row (`RowLayout.attention`). On a CUDA `device` that attention must be one of
    `CUDA_ATTENTIONS` (the CPU runs SDPA too, its mask P^2 per rank)."""
    from transformers import AttentionInterface

    config: Any = model.config  # a Hugging Face model's (torch types a module's attributes as Tensor | Module)
    check_heads(config.get_text_config() if hasattr(config, "get_text_config") else config, world)
    inner = config._attn_implementation
    if inner.startswith(ATTENTION):
        raise ValueError("the model already runs the sequence-parallel attention")
    if inner == "eager":
        raise ValueError(
            "learner.sequence_parallel runs the model's attention through transformers' AttentionInterface: "
            "use sdpa, flex_attention or flash_attention_2, not eager"
        )
    if device is not None and device.type == "cuda" and inner not in CUDA_ATTENTIONS:
        raise ValueError(
            f"learner.sequence_parallel={world} with learner.attention resolved to {inner} on CUDA: its whole-row "
            "mask would be dense, P^2 per rank rather than 1/N, and off the flash kernel; set learner.attention "
            f"to one of {', '.join(CUDA_ATTENTIONS)}"
        )
    AttentionInterface.register(f"{ATTENTION}_{inner}", sequence_parallel_attention)
    model.set_attn_implementation(f"{ATTENTION}_{inner}")  # type: ignore[operator]  # PreTrainedModel's method
    return inner


@contextlib.contextmanager
def plain_attention(model: Any) -> Iterator[None]:
    """While active, a switched model (or a wrapper's `module`) runs its own attention again, the
    plain model whatever mask or varlen arguments its caller builds for it (a probe's forward)."""
    inner = getattr(model, "module", model)
    name = inner.config._attn_implementation
    if not name.startswith(f"{ATTENTION}_"):
        yield
        return
    inner.set_attn_implementation(name.removeprefix(f"{ATTENTION}_"))
    try:
        yield
    finally:
        inner.set_attn_implementation(name)


class _AllToAll(torch.autograd.Function):
    """An exchange of a tensor's `world` leading chunks (chunk j to rank j, chunk i of the output
    from rank i); its own inverse, so the backward is the same exchange of the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return _exchange(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _exchange(grad, ctx.group), None


def _exchange(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def heads_to_sequence(x: torch.Tensor, world: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """[B, H, S, D] (this rank's S slots, every head) -> [B, H/world, world * S, D] (every rank's
    slots in rank order, this rank's share of the heads)."""
    if world == 1:
        return x
    B, H, S, D = x.shape
    parts = x.reshape(B, world, H // world, S, D).transpose(0, 1)
    out = _AllToAll.apply(parts, group)  # [source rank, B, H/world, S, D]
    return out.permute(1, 2, 0, 3, 4).reshape(B, H // world, world * S, D)


def sequence_to_heads(y: torch.Tensor, world: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """[B, world * S, h, D] (every slot, this rank's h heads) -> [B, S, world * h, D] (this rank's
    slots, every head in order): `heads_to_sequence`'s inverse, in attention's output layout."""
    if world == 1:
        return y
    B, L, h, D = y.shape
    parts = y.reshape(B, world, L // world, h, D).transpose(0, 1)
    out = _AllToAll.apply(parts, group)  # [head group, B, S, h, D]
    return out.permute(1, 2, 0, 3, 4).reshape(B, L // world, world * h, D)


class _FewerKvGroups:
    """An attention module as the inner attention sees it once its key/value heads are repeated:
    the same module with fewer query heads per key/value head."""

    def __init__(self, module: torch.nn.Module, groups: int):
        self._module, self.num_key_value_groups = module, groups

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def sequence_parallel_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    sequence_parallel: RowLayout | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention function (`ATTENTION`): q [B, H, S, D], k and v [B, Hkv, S, D] of
    this rank's S slots -> the attention output [B, S, H, D] of its slots, from `layout.attention`
    run on the whole rows (`attention_mask`, built for the slice, is not used: the layout's is).
    Without a layout, the model's own attention on what it is given, under `attention_mask`."""
    from transformers.integrations.sdpa_attention import repeat_kv
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    layout = sequence_parallel
    if layout is None:
        config: Any = module.config  # the attention module's model config
        own = config._attn_implementation.removeprefix(f"{ATTENTION}_")
        return ALL_ATTENTION_FUNCTIONS[own](module, query, key, value, attention_mask, **kwargs)
    world = layout.world
    repeat = check_heads(_Heads(query.shape[1], key.shape[1]), world)
    if repeat > 1:  # GQA with fewer key/value heads than ranks: each rank gets whole copies
        key, value = repeat_kv(key, repeat), repeat_kv(value, repeat)
    inner_module: Any = module if repeat == 1 else _FewerKvGroups(module, query.shape[1] // key.shape[1])
    q, k, v = (heads_to_sequence(t, world, layout.group) for t in (query, key, value))
    inner = ALL_ATTENTION_FUNCTIONS[layout.attention]
    kwargs["position_ids"] = layout.position_ids  # the whole rows'
    for name in VARLEN_KWARGS:  # a slice's sequences, where a caller passed them: the whole rows' instead
        kwargs.pop(name, None)
    if layout.varlen:
        kwargs.update(layout.varlen_kwargs())
    out, _ = inner(inner_module, q, k, v, layout.mask(q.dtype), **kwargs)
    return sequence_to_heads(out, world, layout.group), None


@dataclass(frozen=True)
class _Heads:
    """Head counts in a model config's names, for `check_heads` on the tensors' own shapes."""

    num_attention_heads: int
    num_key_value_heads: int


def sharded_logprobs(
    model: Any,
    rows: ShardedRows,
    rank: int,
    layout: RowLayout,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 log-probs [R, P/world] of the next token at `rank`'s slots of `rows` (0 where not
    `scored`), and their entropies if asked, under `model` (switched by `enable_sequence_parallel`).
    Collective: every rank of `layout.group` runs it on its own slice."""
    ids, targets = rows.local("input_ids", rank), rows.local("targets", rank)
    positions = torch.arange(ids.numel(), device=ids.device).view(ids.shape)
    only = rows.local("scored", rank).reshape(-1).nonzero().squeeze(1)
    with scored_positions(model, positions, targets, temperature, with_entropy, chunk_tokens, only=only) as scored:
        out = model(
            input_ids=ids,
            position_ids=rows.local("position_ids", rank),
            use_cache=False,
            sequence_parallel=layout,
        )
        return scored.read(out.logits)


class _SumOverGroup(torch.autograd.Function):
    """Every rank's tensor summed over the group (each holding its own entries, 0 elsewhere), for a
    loss every rank then computes alike: the gradient is each rank's as it is (the loss is counted
    once, and its entries' gradients reach the rank that computed them)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def sharded_response_logprobs(
    model: Any,
    rows: ShardedRows,
    plan: ShardPlan,
    rank: int,
    layout: RowLayout,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The learner's packed path split over the group: float32 log-probs [B, T] (and entropies) of
    the packing's scored tokens (`plan`: where they sit in `rank`'s slots, `plan_shard`), the same
    on every rank of `layout.group`. Each rank scores the tokens in its own slots, and the ranks'
    results are summed (`_SumOverGroup`): a loss every rank computes alike from them sends each
    rank's tokens their gradient, and the weights' gradients of the ranks add up to one rank's."""
    targets = rows.targets.reshape(-1)[plan.targets]  # the whole row's next token, across the slices' seams
    with scored_positions(
        model, plan.slots, targets, temperature, with_entropy, chunk_tokens, only=plan.mine
    ) as scored:
        out = model(
            input_ids=rows.local("input_ids", rank),
            position_ids=rows.local("position_ids", rank),
            use_cache=False,
            sequence_parallel=layout,
        )
        logp, entropy = scored.read(out.logits)
    if layout.world == 1:
        return logp, entropy
    summed = _SumOverGroup.apply(logp, layout.group)
    return summed, None if entropy is None else _SumOverGroup.apply(entropy, layout.group)


def gather_rows(local: torch.Tensor, world: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Collective, no gradient: every rank's slices [R, S] of rows joined in rank order, [R, world * S]."""
    if world == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=1)
