"""Rollout routing replay (R3): the learner's mixture-of-experts layers route each token to the
experts the generation engine routed it to, and recompute only the gate weights over them.

The engine and the learner route the same token differently (other kernels, batch shapes,
numerics); a token sent to other experts gets a different log-prob, the importance weights of MoE
RL explode and runs collapse. Replayed, the expert set is the engine's and the gate weights are the
learner's own function of its router logits, so the router and the experts still get the
gradients they get on the normal path.

- `RoutedExperts` (`routed_experts`, torch-free): a sample's routing in its compact form, the
  shape vLLM returns ([tokens, layers, top_k] from the sequence position `start` on).
- `padded_layout`, then `rows_layout` (packed rows where `response_logprobs` packs) and
  `sharded_layout` (a sequence-parallel rank's slice): a micro-batch's routings in the order its
  MoE layers see tokens; tokens the engine gave no routing for (before `start`, the last token,
  padding, a packed row's tail) keep the model's own.
- `RoutingReplay`: hooks on the routers of a Hugging Face softmax-top-k MoE (Qwen3-MoE,
  Qwen2-MoE with its shared expert, OLMoE, Mixtral, Qwen3-Next, Qwen3.5-MoE); `use(layout)`
  replays for the forwards inside it (and counts, on the device, how often the model's own top-k
  agrees: `telemetry`). No model class is patched.
- `capture_routing`: the experts the model chooses itself, per token (telemetry and tests);
  `routing_agreement` and `load_balance`: the telemetry, as `(value, metrics)`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from rlhf_cluster.models.packing import PackedRows, packing_pays
from rlhf_cluster.models.routed_experts import RoutedExperts, expand_routing

# Routers that pick the top-k of softmax(logits) and weigh the picks by those probabilities
# (renormalised over the picks where `norm_topk_prob`, or always where the class has no such
# setting): the gate weights over any expert set are then softmax(logits) gathered at it.
SOFTMAX_TOPK_ROUTERS = frozenset(
    {
        "Qwen3MoeTopKRouter",
        "Qwen2MoeTopKRouter",
        "OlmoeTopKRouter",
        "MixtralTopKRouter",
        "Qwen3NextTopKRouter",
        "Qwen3_5MoeTopKRouter",
    }
)
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class RoutingShape:
    """What a routing of the model holds (read from the routers the model runs; `models.moe`
    answers the same from a config): `layers` decoder layers (the MoE ones are `moe_layers`;
    a dense layer's row is ignored), `top_k` choices among `num_experts`."""

    layers: int
    top_k: int
    num_experts: int
    moe_layers: tuple[int, ...]


@dataclass
class ReplayLayout:
    """A batch's replayed routing in the order its MoE layers see tokens (the model's input rows,
    flattened): `experts` [N, layers, top_k] small ints (uint8 up to 256 experts); `replayed` [N]
    bool, False where the engine gave none (the model routes those tokens itself)."""

    experts: torch.Tensor
    replayed: torch.Tensor

    def to(self, device: torch.device | str) -> ReplayLayout:
        """On `device` (once per micro-batch, not once per layer)."""
        return ReplayLayout(self.experts.to(device), self.replayed.to(device))


def moe_routers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(decoder layer index, router) of every MoE layer of a Hugging Face model, in layer order.
    Refuses a model with none (a dense model) and routers whose gate weights replay cannot
    recompute, naming them."""
    found, unsupported = [], set()
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind in SOFTMAX_TOPK_ROUTERS:
            match = _LAYER_INDEX.search(name + ".")
            if match is None:
                raise ValueError(f"routing replay: router {name} ({kind}) sits outside the decoder layers")
            found.append((int(match.group(1)), module))
        elif kind.endswith(("TopKRouter", "TopkRouter")) or (kind.endswith("Router") and hasattr(module, "top_k")):
            unsupported.add(kind)
    if unsupported:
        raise ValueError(
            f"routing replay: routers {sorted(unsupported)} are not softmax top-k routers; replay supports "
            f"{sorted(SOFTMAX_TOPK_ROUTERS)}"
        )
    if not found:
        kind = type(getattr(model, "module", model)).__name__
        raise ValueError(f"routing replay needs a mixture-of-experts model; {kind} has no MoE layers")
    return sorted(found, key=lambda pair: pair[0])


def routing_shape(model: torch.nn.Module) -> RoutingShape:
    """The routing shape of `model` (`moe_routers`), its layer axis counting every decoder layer."""
    routers = moe_routers(model)
    config = getattr(getattr(model, "module", model), "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    layers = int(getattr(text, "num_hidden_layers", 0) or 0) or routers[-1][0] + 1
    first: dict = vars(routers[0][1])  # the router's plain attributes (top_k, num_experts)
    return RoutingShape(layers, int(first["top_k"]), int(first["num_experts"]), tuple(layer for layer, _ in routers))


def padded_layout(
    routings: Sequence[RoutedExperts | None],
    sample_ids: Sequence[str],
    sequence_lengths: Sequence[int],
    padded_len: int,
    shape: RoutingShape,
) -> ReplayLayout:
    """The layout of right-padded rows [B, `padded_len`]: row i's sequence of `sequence_lengths[i]`
    tokens replays `routings[i]` from its `start` (None: the model routes that sample itself)."""
    B = len(routings)
    dtype = torch.uint8 if shape.num_experts <= 256 else torch.int32  # widened to long one layer at a time
    experts = torch.zeros(B * padded_len, shape.layers, shape.top_k, dtype=dtype)
    replayed = torch.zeros(B * padded_len, dtype=torch.bool)
    for i, routed in enumerate(routings):
        if routed is None:
            continue
        array = expand_routing(routed, sample_ids[i], sequence_lengths[i], shape.layers, shape.top_k, shape.num_experts)
        lo = i * padded_len + routed.start
        experts[lo : lo + len(array)] = torch.from_numpy(array).to(dtype)
        replayed[lo : lo + len(array)] = True
    return ReplayLayout(experts, replayed)


def packed_layout(padded: ReplayLayout, gather: torch.Tensor, sequence_ids: torch.Tensor) -> ReplayLayout:
    """`padded`'s layout moved to packed rows (`PackedRows.gather` and `.sequence_ids`, [R, C]):
    each slot takes its token's routing; a row's tail (no sequence) keeps the model's own."""
    flat = gather.reshape(-1).to(padded.experts.device)
    tail = sequence_ids.reshape(-1).to(padded.experts.device) < 0
    return ReplayLayout(padded.experts[flat], padded.replayed[flat] & ~tail)


def rows_layout(padded: ReplayLayout, packing: PackedRows | None, always: bool = False) -> ReplayLayout:
    """The layout for the rows `modeling.response_logprobs` runs a micro-batch on: its packed rows
    where it packs (`packing` given and `packing_pays`, or `always`, as sequence parallelism
    packs), the padded rows otherwise."""
    if packing is not None and (always or packing_pays(packing, padded.replayed.numel())):
        return packed_layout(padded, packing.gather, packing.sequence_ids)
    return padded


def sharded_layout(packed: ReplayLayout, rows: int, world: int, rank: int) -> ReplayLayout:
    """`packed`'s layout of `rows` packed rows cut as sequence parallelism cuts them
    (`sequence_parallel.shard_rows`): each row padded to a multiple of `world` slots (the padding
    not replayed), and `rank`'s contiguous 1/`world` of every row."""
    experts = packed.experts.view(rows, -1, *packed.experts.shape[1:])
    replayed = packed.replayed.view(rows, -1)
    pad = -experts.shape[1] % world
    if pad:
        experts = torch.cat([experts, experts.new_zeros(rows, pad, *experts.shape[2:])], dim=1)
        replayed = torch.cat([replayed, replayed.new_zeros(rows, pad)], dim=1)
    width = experts.shape[1] // world
    part = slice(rank * width, (rank + 1) * width)
    return ReplayLayout(experts[:, part].reshape(-1, *experts.shape[2:]), replayed[:, part].reshape(-1))


def replayed_gate_weights(router: torch.nn.Module, logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The gate weights of a softmax top-k `router` over the experts `chosen` [N, top_k]: its
    softmax (float32) at them, renormalised over them where the router renormalises its own
    (`norm_topk_prob`; routers without the setting always do). Equal to the router's own weights
    when `chosen` is its own top-k, and differentiable in the logits the same way."""
    weights = torch.softmax(logits, dim=-1, dtype=torch.float).gather(-1, chosen)
    if getattr(router, "norm_topk_prob", True):
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights


class RoutingReplay:
    """Hooks on the routers of `model` (`moe_routers`) that replay a layout's experts inside
    `use(layout)`; outside it the model routes as usual. Install once per model; `remove` takes
    the hooks off.

    Gradient checkpointing re-runs a layer's forward during the backward (under no gradient the
    first time where it is reentrant): each layer keeps the layout its latest replayed forward used
    and replays it again when recomputed, so the backward of a replayed forward must come before
    the next replayed forward (the learner's micro-batch loop), and while the hooks are on, every
    forward that is trained on runs inside `use` (one with gradients outside it forgets the layout).

    Each replayed forward also counts, on the device, how many replayed (token, layer) pairs the
    model's own top-k would have routed to the same expert set, and the tokens each expert got:
    `telemetry` reads them out. A layer's own choice there follows the replayed routing of the
    layers before it (a per-router agreement); `capture_routing` on a forward without replay gives
    the end-to-end one.
    """

    def __init__(self, model: torch.nn.Module):
        routers = moe_routers(model)
        self.shape = routing_shape(model)
        self._layout: ReplayLayout | None = None
        self._last: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per layer: what it replayed last
        self._same: list[torch.Tensor] = []  # per replayed layer forward: pairs the model's own routing agrees on
        self._pairs: list[torch.Tensor] = []  # ... and pairs replayed
        self._load: dict[int, torch.Tensor] = {}  # per layer: tokens per expert, [num_experts]
        self._handles = [router.register_forward_hook(self._hook(layer)) for layer, router in routers]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextmanager
    def use(self, layout: ReplayLayout) -> Iterator[None]:
        """Forwards inside replay `layout` (laid out for the rows they run: `rows_layout`)."""
        self._layout = layout
        try:
            yield
        finally:
            self._layout = None

    def telemetry(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The share of replayed (token, MoE layer) pairs the model's own routing sends to the same
        expert set as the engine did (1.0 where nothing was replayed), and the replayed routing's
        load balance (`load_balance`'s metrics), over the forwards since the last call; resets."""
        if not self._pairs:
            one = torch.ones(())
            return one, {"expert_set_agreement": one, "replayed_pairs": torch.zeros(())}
        pairs = torch.stack(self._pairs).sum()
        share = torch.where(pairs > 0, torch.stack(self._same).sum() / pairs.clamp_min(1), 1.0)
        counts = torch.stack([self._load[layer] for layer in sorted(self._load)]).float()
        ratio = counts.max(-1).values / counts.mean(-1).clamp_min(1e-9)
        self._same, self._pairs, self._load = [], [], {}
        metrics = {"expert_set_agreement": share, "replayed_pairs": pairs}
        metrics.update(load_max_over_mean=ratio.mean(), load_max_over_mean_worst=ratio.max())
        return share, metrics

    def _hook(self, layer: int):
        def hook(router: torch.nn.Module, args, output):
            if torch._C._current_graph_task_id() != -1:  # a checkpointed layer recomputed in the backward
                entry = self._last.get(layer)
                return None if entry is None else _replayed_output(router, layer, output, *entry)[0]
            if self._layout is None:
                if torch.is_grad_enabled():
                    self._last.pop(layer, None)
                return None
            entry = self._last[layer] = (self._layout.experts[:, layer], self._layout.replayed)
            replayed_output, same = _replayed_output(router, layer, output, *entry)
            self._count(layer, replayed_output[2], same, entry[1])
            return replayed_output

        return hook

    @torch.no_grad()
    def _count(self, layer: int, chosen: torch.Tensor, same: torch.Tensor, replayed: torch.Tensor) -> None:
        """Adds one layer forward's agreement and expert load to the telemetry (device tensors)."""
        self._same.append(same.sum())
        self._pairs.append(replayed.sum().to(same.device))
        load = torch.bincount(chosen.reshape(-1), minlength=self.shape.num_experts)
        self._load[layer] = self._load[layer] + load if layer in self._load else load


def _replayed_output(
    router: torch.nn.Module, layer: int, output: tuple, experts: torch.Tensor, replayed: torch.Tensor
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The router's (logits, weights, indices) with the replayed experts where `replayed`, and
    which replayed tokens its own choice routed to the same expert set [N] bool."""
    logits, scores, own = output
    if experts.shape[0] != own.shape[0]:
        raise ValueError(
            f"routing replay: the layout holds {experts.shape[0]} tokens but MoE layer {layer} runs "
            f"{own.shape[0]}; lay it out for the rows the model runs (padded_layout, rows_layout)"
        )
    mask = replayed.to(own.device)
    chosen = torch.where(mask[:, None], experts.to(own.device, torch.long), own)
    same = (chosen.sort(-1).values == own.sort(-1).values).all(-1) & mask
    return (logits, replayed_gate_weights(router, logits, chosen).to(scores.dtype), chosen), same


@contextmanager
def capture_routing(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside, every forward of `model` appends its routing, [N, layers, top_k] long (in the order
    its MoE layers see tokens; dense layers' rows are 0), to the list yielded: the experts it chose
    itself, or those a `RoutingReplay` installed earlier replayed."""
    shape = routing_shape(model)
    routers = moe_routers(model)
    seen: dict[int, torch.Tensor] = {}
    out: list[torch.Tensor] = []

    def recorder(layer: int):
        def hook(router, args, output):
            seen[layer] = output[2].detach()
            if len(seen) == len(routers):
                first = next(iter(seen.values()))
                full = torch.zeros(first.shape[0], shape.layers, shape.top_k, dtype=torch.long, device=first.device)
                for index, chosen in seen.items():
                    full[:, index] = chosen
                out.append(full)
                seen.clear()

        return hook

    handles = [router.register_forward_hook(recorder(layer)) for layer, router in routers]
    try:
        yield out
    finally:
        for handle in handles:
            handle.remove()


def routing_agreement(
    engine: torch.Tensor, learner: torch.Tensor, mask: torch.Tensor | None = None, layers: Sequence[int] | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The share of (token, MoE layer) pairs whose expert set (order ignored) is the same in the
    routings `engine` and `learner` [N, layers, top_k], over the tokens `mask` [N] marks (default
    all) and the decoder `layers` given (default all). Metrics: that share, the share of tokens
    routed alike at every layer, and the tokens counted."""
    if engine.shape != learner.shape or engine.ndim != 3:
        raise ValueError(
            f"routing agreement: routings must share one shape [tokens, layers, top_k]; "
            f"got {list(engine.shape)} and {list(learner.shape)}"
        )
    if layers is not None:
        engine, learner = engine[:, list(layers)], learner[:, list(layers)]
    same = (engine.sort(-1).values == learner.sort(-1).values).all(-1)  # [N, layers]
    m = torch.ones(same.shape[0], dtype=torch.bool, device=same.device) if mask is None else mask.bool()
    n = m.sum().clamp_min(1)
    share = (same & m[:, None]).sum() / (n * same.shape[1])
    whole = (same.all(-1) & m).sum() / n
    return share, {"expert_set_agreement": share, "token_agreement": whole, "tokens": m.sum()}


def load_balance(
    routing: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None, layers: Sequence[int] | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Tokens per expert [layers, num_experts] of `routing` [N, layers, top_k] over the tokens
    `mask` marks and the decoder `layers` given. Metrics: max/mean load (1 is perfectly even),
    averaged over the layers and at the worst layer."""
    if layers is not None:
        routing = routing[:, list(layers)]
    m = torch.ones(routing.shape[0], dtype=torch.bool, device=routing.device) if mask is None else mask.bool()
    one_hot = torch.nn.functional.one_hot(routing[m], num_experts)  # [n, layers, top_k, experts]
    counts = one_hot.sum(dim=(0, 2)).to(torch.float32)
    ratio = counts.max(-1).values / counts.mean(-1).clamp_min(1e-9)
    return counts, {"load_max_over_mean": ratio.mean(), "load_max_over_mean_worst": ratio.max()}
