"""A learner's routing of a mixture-of-experts policy: rollout routing replay in its training
forwards, and each step's routing telemetry.

With `algorithm.routing_replay: rollout` every forward the learner trains on (and the no-gradient
forwards of the PPO denominator, π_prox) runs inside `replayed(b, micro)`: the micro-batch's
samples' routed experts (`TrainBatch.routings`, the engine's) laid out for the rows the model runs
(padded, packed, or a sequence-parallel rank's slice: `models.routing_replay`), so its MoE layers
use the engine's experts and recompute only the gate weights. The reference forwards (LoRA's base
model) route themselves.

Telemetry, with replay or without, on every MoE policy whose rollouts carry routed experts:
`probe` runs the step's first micro-batch twice more without gradients before the step, once
routed by the learner itself and once replayed, and measures on those same tokens the share of
(token, MoE layer) pairs whose expert set the learner picks as the engine did, the train-inference
mismatch (k3 against the rollout log-probs) both ways, and the load balance of the engine's
routing. Two extra forwards of one micro-batch, no backward: a fraction of a step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist

from rlhf_cluster.algorithms.correction import importance_weights
from rlhf_cluster.experience.records import TrainBatch
from rlhf_cluster.learner.micro_batches import MicroBatch
from rlhf_cluster.models.moe import is_moe
from rlhf_cluster.models.routing_replay import (
    ReplayLayout,
    RoutingReplay,
    capture_routing,
    load_balance,
    padded_layout,
    routing_agreement,
    routing_shape,
    rows_layout,
    sharded_layout,
)

log = logging.getLogger(__name__)

Logprobs = Callable[[], tuple[torch.Tensor, Any]]  # one forward of a micro-batch: (log-probs [rows, T], entropy)


class LearnerRouting:
    """Routing replay and telemetry for one MoE policy model (`of` builds it, or says None for a
    dense one). `sequence`: (group size, this rank), where sequence parallelism cuts packed rows."""

    def __init__(self, model: torch.nn.Module, replay: bool, sequence: tuple[int, int] | None = None):
        self.model = model
        self.shape = routing_shape(model)  # refuses routers whose gate weights cannot be recomputed
        self.replay = RoutingReplay(model) if replay else None
        self.sequence = sequence

    @classmethod
    def of(cls, model: torch.nn.Module, mode: str, sequence: tuple[int, int] | None = None) -> LearnerRouting | None:
        """For `algorithm.routing_replay` = `mode`: None for a dense model (refused with `rollout`)."""
        config = getattr(getattr(model, "module", model), "config", None)
        if config is None or not is_moe(config):
            if mode == "rollout":
                kind = type(getattr(model, "module", model)).__name__
                raise ValueError(f"algorithm.routing_replay=rollout: the policy ({kind}) has no MoE layers")
            return None
        if mode == "rollout":
            return cls(model, True, sequence)
        try:
            return cls(model, False, sequence)
        except ValueError as exc:  # routers telemetry cannot read: train without it, say so once
            log.warning("routing telemetry off: %s", exc)
            return None

    def layout(self, b: TrainBatch, micro: MicroBatch) -> ReplayLayout | None:
        """The micro-batch's routed experts laid out for the rows its forward runs, on the model's
        device; None when none of its samples carries any."""
        if b.routings is None:
            return None
        rows = _indices(micro.rows, len(b.routings))
        routings = [b.routings[i] for i in rows]
        if all(r is None for r in routings):
            return None
        ids = [b.sample_ids[i] for i in rows]
        lengths = b.attention_mask[micro.rows].sum(1).tolist()
        padded = padded_layout(routings, ids, lengths, b.input_ids.shape[1], self.shape)
        laid = rows_layout(padded, micro.packing, always=self.sequence is not None)
        if self.sequence is not None and micro.packing is not None:
            world, rank = self.sequence
            laid = sharded_layout(laid, micro.packing.gather.shape[0], world, rank)
        return laid.to(b.input_ids.device)

    def replayed(self, b: TrainBatch, micro: MicroBatch):
        """The context a training forward of `micro` runs in: the engine's experts replayed
        (`routing_replay: rollout`; every sample must carry them), or nothing."""
        if self.replay is None:
            return nullcontext()
        missing = [b.sample_ids[i] for i in _indices(micro.rows, len(b.sample_ids)) if not _routed(b, i)]
        if missing:
            raise ValueError(
                f"algorithm.routing_replay=rollout: samples {missing[:3]} carry no routed experts (their engine "
                "returned none); replay needs the experts of every sample, or set routing_replay: none"
            )
        layout = self.layout(b, micro)
        return nullcontext() if layout is None else self.replay.use(layout)

    @torch.no_grad()
    def probe(self, b: TrainBatch, micro: MicroBatch, forward: Logprobs) -> dict[str, float]:
        """The step's routing telemetry on `micro` (see the module's docstring). Every rank of the
        learner calls it (its forwards are collective, its counts summed over the ranks); empty
        when no rank's micro-batch carries routed experts."""
        layout = self.layout(b, micro) if micro.real else None
        if not _any_rank(layout is not None, b.input_ids.device):  # nothing to compare: no extra forwards
            return {}
        with capture_routing(self.model) as seen:
            own, _ = forward()
        with self._replaying(layout):
            replayed, _ = forward()
        counts = torch.zeros(6, dtype=torch.float64, device=b.input_ids.device)
        if layout is not None:
            engine, mask = layout.experts.long(), b.response_mask[micro.rows]
            share, agreement = routing_agreement(engine, torch.cat(seen), layout.replayed, self.shape.moe_layers)
            _, balance = load_balance(engine, self.shape.num_experts, layout.replayed, self.shape.moe_layers)
            tokens, n = agreement["tokens"], mask.sum()
            k3 = [self._k3(p, b.rollout_logprobs[micro.rows], mask) for p in (replayed, own)]
            parts = [share * tokens, tokens, k3[0] * n, k3[1] * n, n, balance["load_max_over_mean"]]
            counts = counts + torch.stack([p.to(counts) for p in parts])
        counts = torch.cat([counts, counts.new_ones(1) * (layout is not None)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        agree, tokens, with_k3, without_k3, n, balance, ranks = counts.tolist()
        if ranks == 0:
            return {}
        return {
            "routing/expert_set_agreement": agree / max(tokens, 1.0),
            "routing/mismatch_k3_with_replay": with_k3 / max(n, 1.0),
            "routing/mismatch_k3_without_replay": without_k3 / max(n, 1.0),
            "routing/load_max_over_mean": balance / ranks,
        }

    def finish_step(self) -> None:
        """After a step: the replay hooks' own counts of its forwards are let go (the probe measures)."""
        if self.replay is not None:
            self.replay.telemetry()

    @contextmanager
    def _replaying(self, layout: ReplayLayout | None) -> Iterator[None]:
        """Replay `layout` for the forwards inside, with the policy's own hooks or (routing_replay:
        none) hooks put on for the probe and taken off after."""
        if layout is None:
            yield
            return
        replay = self.replay or RoutingReplay(self.model)
        try:
            with replay.use(layout):
                yield
        finally:
            replay.telemetry()  # the probe's counts are not the training forwards'
            if replay is not self.replay:
                replay.remove()

    @staticmethod
    def _k3(logprobs: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """k3 of the learner's log-probs against the engine's over `mask` (a device scalar)."""
        _, metrics = importance_weights(logprobs.float(), rollout.float(), mask)
        return metrics["mismatch_k3"]


def _indices(rows: slice | torch.Tensor, count: int) -> list[int]:
    """A micro-batch's rows of the step's batch as indices."""
    return list(range(count)[rows]) if isinstance(rows, slice) else rows.tolist()


def _routed(b: TrainBatch, row: int) -> bool:
    return b.routings is not None and b.routings[row] is not None


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on any rank of the learner (every rank asks; one tiny collective)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
