"""What every learner backend shares: the RL train step over micro-batches, metric reduction and
probe log-probs (a checkpoint's host-side part and the state digest: `host_state`; the memory
plan: `memory_plan`).

A backend (FSDP2, DeepSpeed) owns only sharding, the optimizer, the backward/step mechanics, the
full state dict and its checkpoint files. The caller has initialised `torch.distributed` (gloo on
CPU, nccl on CUDA). Every rank receives its own slice of the step's batch plus the *global*
counts, so the loss denominator is the same on every rank and for every micro-batch. Both
backends average gradients over ranks, so each rank scales its loss by the world size to turn
that average into the sum the global denominator expects. With `learner.sequence_parallel` the
ranks of a group join their slices first and split each row instead (`sequence_groups`).
"""

from __future__ import annotations

import functools
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rlhf_cluster.experience.records import TrainBatch
from rlhf_cluster.learner.host_state import restore_host_state, save_host_state, state_digest
from rlhf_cluster.learner.images import LearnerImages, probe_forward
from rlhf_cluster.learner.memory_plan import MemoryPlan, plan_for_folder, plan_memory
from rlhf_cluster.learner.micro_batches import MicroBatch, plan_micro_batches
from rlhf_cluster.learner.objective import RLObjective
from rlhf_cluster.learner.proximal import ProximalPolicy, global_counts
from rlhf_cluster.learner.routing import LearnerRouting
from rlhf_cluster.learner.sequence_groups import SequenceGroup, group_logprobs, group_share, model_attention
from rlhf_cluster.learner.spec import LearnerSpec, Passes
from rlhf_cluster.learner.step_metrics import StepMetrics
from rlhf_cluster.models.chunked_logprobs import logprob_head
from rlhf_cluster.models.flops import FlopsShape
from rlhf_cluster.models.fused_logprobs import logprob_head_for
from rlhf_cluster.models.modeling import attention_of, response_logprobs
from rlhf_cluster.models.packing import to_device
from rlhf_cluster.telemetry import tracing


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class LearnerBase(ABC):
    """One rank of the policy learner: the backend-independent RL step and bookkeeping.

    Subclasses set `self.model` (a callable module or engine with `train()`/`eval()`) and
    `self.scheduler` (an LR scheduler whose `step()` runs once per applied train step), and
    implement the backward/step hooks and the state methods.
    """

    backend_name = "base"
    # Whether the ranks compute the policy loss: False for the critic's, which then never import the
    # user's `algorithm.loss.function`.
    trains_policy = True

    def __init__(self, spec: LearnerSpec):
        if not dist.is_initialized():
            raise RuntimeError(f"{type(self).__name__} needs torch.distributed initialised by the caller")
        self.spec = spec
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = default_device()
        torch.manual_seed(spec.learner.seed)
        self.bad_steps = 0
        self.objective = RLObjective(spec.algorithm, spec.max_new_tokens, user_loss=self.trains_policy)
        self.temperature = spec.temperature
        # The output layer's log-prob head for the step's passes (`learner.logprob_head`).
        lc = spec.learner
        self.logprob_head = logprob_head_for(
            lc.logprob_head, self.device, spec.algorithm.entropy_coef > 0, lc.mixed_precision == "bf16"
        )
        self.step = 0
        self.updates = 0  # optimizer steps applied (one per mini-batch and epoch a non-finite loss did not skip)
        self.model: Any = None
        self.scheduler: Any = None
        self.memory_plan = plan_memory(spec.learner, None, self.world_size, None)  # a subclass plans by its model
        self.sequence: SequenceGroup | None = None  # learner.sequence_parallel > 1: set by the backend
        self.images: LearnerImages | None = None  # a vision-language policy's processor: set by the backend
        # Host-side agreements (how many micro-batches) go over gloo, never through the device.
        self.host_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None

    def _plan_memory(self, model_path: str) -> MemoryPlan:
        """Checkpointing and micro-batch tokens for `model_path` on this device (`memory_plan`)."""
        self.memory_plan = plan_for_folder(
            self.spec.learner, model_path, self.world_size, self.device, self.rank == 0, self.spec.longest_row
        )
        return self.memory_plan

    # ---- backend hooks ---------------------------------------------------------------------
    @abstractmethod
    def _backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        """Accumulate the gradient of `loss` (already scaled for the rank average); the last
        micro-batch of a mini-batch is marked so a backend can close its accumulation there."""

    @abstractmethod
    def _clip_and_step(self, loss: torch.Tensor, also_read: torch.Tensor) -> tuple[float, bool, list[float]]:
        """Clip to `learner.max_grad_norm`, step unless the global gradient norm or this rank's
        summed `loss` (a device scalar) is not finite, clear gradients. The update's one host read
        takes the norm, the loss and `also_read` (a flat device tensor) together. Returns (pre-clip
        global gradient norm, step applied, [loss, *also_read] as floats)."""

    @abstractmethod
    def named_full_tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Collective generator: the full (unsharded) fp32 CPU tensors, in state-dict order and
        under the plain model's names, gathered one at a time; rank 0 gets them, other ranks get
        nothing but must run it to the end too (their part of every gather).

        With `dtype` (what the generation engines hold): floating tensors are cast to it on the
        device, before they leave it, and an output embedding tied to the input one is left out
        (the engine ties it itself, `VLLMEngine.optional_tensors`): what crosses to the host is
        exactly what an engine loads."""

    def deals_engine_tensors(self) -> bool:
        """Whether `named_engine_tensors` can hand each rank its own share (`owner`)."""
        return False

    def named_engine_tensors(
        self, dtype: torch.dtype, owner: Callable[[str, torch.Tensor], int] | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Collective generator: what the generation engines load for a version, in their `dtype`:
        with LoRA and `learner.lora.sync: adapters` the adapter matrices alone (peft's names, see
        `rlhf_cluster.learner.lora`), else `named_full_tensors(dtype)`. With `owner` (where
        `deals_engine_tensors`; asked on every rank of every tensor, in order: the rank that sends
        it) each rank gets the tensors it sends; else rank 0 gets all. A tensor may still be on the
        learner's GPU (the transport copies it to the host before its publish returns)."""
        if owner is not None:
            raise NotImplementedError(f"{type(self).__name__} does not deal its tensors to the ranks")
        return self.named_full_tensors(dtype)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the whole `named_full_tensors` (fp32, tied tensors under both names) on rank 0,
        empty on other ranks."""
        return dict(self.named_full_tensors())

    def reference_logprobs(self, local: TrainBatch) -> torch.Tensor | None:
        """Collective: the reference log-probs of the host batch `local` the learner computes itself
        (LoRA: the base model); None: the batch's, from the reference workers."""
        if not self.spec.learner.lora.enabled:
            return None
        return self._reference_logprobs(self._to_device(local), [self._micro_batches(local, 0, len(local.input_ids))])

    def _reference_logprobs(self, b: TrainBatch, plans: list[list[MicroBatch]]) -> torch.Tensor | None:
        """`reference_logprobs` of the device batch `b`, pass by pass of `plans`."""
        return None

    @abstractmethod
    def _digest_parts(self) -> dict[str, Any]:
        """This rank's model and optimizer state (local shards) as a nested dict to hash."""

    @abstractmethod
    def save_checkpoint(self, directory: str | Path) -> tuple[Future, str]:
        """Stage this rank's shards and write them; returns the write's future and the digest."""

    @abstractmethod
    def load_checkpoint(self, directory: str | Path) -> str:
        """Restore model, optimizer, scheduler, step and RNG from a checkpoint; returns the digest."""

    def apply_settings(self) -> None:
        """After a restore: this job's `lr` and `weight_decay` replace the checkpoint's (a resume
        with `--set learner.lr=...` means it); the schedule keeps the checkpoint's position."""
        lc, scheduler = self.spec.learner, self.scheduler
        groups = scheduler.optimizer.param_groups
        scheduler.base_lrs = [lc.lr] * len(groups)
        for group, factor in zip(groups, scheduler.lr_lambdas):
            group.update(initial_lr=lc.lr, weight_decay=lc.weight_decay, lr=lc.lr * factor(scheduler.last_epoch))
        scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr reports until the next step

    @abstractmethod
    def shard_info(self) -> dict[str, tuple[int, int]]:
        """Per parameter: (elements held by this rank, elements of the full parameter)."""

    # ---- helpers ---------------------------------------------------------------------------
    def _accumulate(self, loss: torch.Tensor, real: bool, last_micro_batch: bool) -> torch.Tensor | None:
        """Backward one micro-batch's loss (over the global denominator); returns it detached (on
        the device: not read here), or None for a padding pass, which runs only so the ranks'
        collectives pair up."""
        if not real:
            loss = loss * 0.0
        # Both backends average gradients over ranks; x world size turns that into the global sum.
        self._backward(loss * self.world_size, last_micro_batch)
        return loss.detach() if real else None

    def _all_reduce(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def _to_device(self, batch: TrainBatch) -> TrainBatch:
        """The host batch on the learner's device, by copies the host does not wait for (`to_device`)."""
        # Any: the values of every field (tensors, sample ids, None), passed back to the constructor by name.
        fields: dict[str, Any] = {
            k: (to_device(v, self.device) if isinstance(v, torch.Tensor) else v) for k, v in vars(batch).items()
        }
        return TrainBatch(**fields)

    @torch.no_grad()
    def _frozen_logprobs(self, b: TrainBatch, plans: list[list[MicroBatch]], replay: bool = True) -> torch.Tensor:
        """Log-probs [B, T] of the device batch `b` under the model as it is, no gradient, pass by
        pass of `plans`, padding passes included (their collectives pair up); `replay`: the
        engine's experts replayed as in training (not for a reference)."""
        out = torch.zeros_like(b.rollout_logprobs, dtype=torch.float32)
        for micro in (entry for plan in plans for entry in plan):
            logprobs, _ = self._logprobs(b, micro, with_entropy=False, replay=replay)
            if micro.real:
                out[micro.rows] = logprobs
        return out

    def _logprobs(self, b: TrainBatch, micro: MicroBatch, with_entropy: bool, replay: bool = False):
        """`micro`'s log-probs [rows, T] (and entropies); `replay`: a policy forward, which replays
        the engine's experts where `algorithm.routing_replay` says so (`routing`)."""
        rows = micro.rows
        routed = self.routing.replayed(b, micro) if replay and self.routing is not None else nullcontext()
        with logprob_head(self.logprob_head), routed:
            if self.sequence is not None:  # never with images (`plan_micro_batches` refuses them)
                return group_logprobs(self.model, b, micro, self.sequence, self.temperature, with_entropy)
            return response_logprobs(
                self.model,
                b.input_ids[rows],
                b.attention_mask[rows],
                b.prompt_lengths[rows],
                b.response_mask.shape[1],
                self.temperature,
                with_entropy,
                packed=micro.packing is not None,
                packing=micro.packing,
                inputs=micro.inputs,
            )

    # ---- the step --------------------------------------------------------------------------
    def _optimize(
        self,
        epochs: int,
        plans: list[list[MicroBatch]],
        micro_loss: Callable[[int, MicroBatch], tuple[torch.Tensor, dict]],
        read_at_last_update: Callable[[Passes], torch.Tensor] | None = None,
    ) -> Passes:
        """The one epoch / mini-batch / micro-batch loop of every learner (policy and critic).

        `plans[k]` is mini-batch k's micro-batches (`_micro_batches`); `micro_loss(k, micro)` is a
        micro-batch's loss over its mini-batch's global denominator, so the accumulated gradients
        add up to the mini-batch's. Each mini-batch ends with one clipped optimizer step (skipped
        when the loss or the global gradient norm is not finite); the LR schedule advances once
        per learner step unless an update was skipped. Nothing inside waits for the device but
        each update's decision: `read_at_last_update(passes)` (the step's metrics, as one flat
        device tensor) is read along with the last one, into `passes.step_values`.
        """
        passes = Passes()
        empty = torch.zeros(0, dtype=torch.float64, device=self.device)
        for epoch in range(epochs):
            epoch_losses = []
            for mini, plan in enumerate(plans):
                total = torch.zeros((), dtype=torch.float64, device=self.device)
                for index, micro in enumerate(plan):
                    with tracing.span("forward", mini_batch=mini):
                        loss, metrics = micro_loss(mini, micro)
                    with tracing.span("backward", mini_batch=mini):
                        value = self._accumulate(loss, micro.real, last_micro_batch=index == len(plan) - 1)
                    if value is None:
                        continue
                    total = total + value
                    passes.micro_metrics.append((micro.rows, metrics))
                passes.loss_tensors.append(total)
                last = epoch == epochs - 1 and mini == len(plans) - 1
                also = read_at_last_update(passes) if last and read_at_last_update is not None else empty
                with tracing.span("optimizer", mini_batch=mini):
                    passes.grad_norm, applied, values = self._clip_and_step(total, also)
                passes.skipped += int(not applied)
                self.updates += int(applied)
                epoch_losses.append(values[0])
                if last:
                    passes.step_values = values[1:]
            passes.losses.append(epoch_losses)
        self.step += 1
        if passes.skipped == 0:
            self.scheduler.step()
        return passes

    def reset_optimizer(self) -> None:
        """Clear the optimizer's state (AdamW's moments and step count: the next update starts as a
        first one) as ProRL does at a reference reset; the LR schedule and the step count go on.
        FSDP2's (`FSDP2Learner.reset_optimizer`); preflight refuses it for the other backends."""
        raise NotImplementedError(f"{type(self).__name__}: no optimizer reset (learner.backend fsdp2 has one)")

    def _micro_batches(self, local: TrainBatch, lo: int, hi: int) -> list[MicroBatch]:
        """Rows [lo, hi) of the host batch `local` as this step's passes (`plan_micro_batches`)."""
        lc, plan = self.spec.learner, self.memory_plan
        return plan_micro_batches(
            local,
            lo,
            hi,
            plan.micro_batch_tokens,
            lc.sequence_packing,
            self.device,
            self._attention_implementation(),
            self.host_group,
            None if self.sequence is None else (self.sequence.size, self.sequence.rank),
            None
            if self.images is None
            else functools.partial(self.images.inputs, self.model, local, device=self.device),
        )

    def _attention_implementation(self) -> str:
        """The attention the learner's model runs (how its packed rows are sized)."""
        return model_attention(attention_of(self.model)[0])

    def train_step(self, local: TrainBatch, kl_coef: float = 0.0) -> dict[str, float]:
        """One optimizer step per mini-batch over this rank's share of the step's batch; a
        mini-batch is accumulated over micro-batches when a token budget applies. The device is
        waited for once per optimizer step (`_clip_and_step`'s read), the step's metrics with the last."""
        start = time.perf_counter()
        lc = self.spec.learner
        local, alike = group_share(local, self.sequence)  # a sequence-parallel group's ranks run the same rows
        B = local.response_mask.shape[0]
        bounds = [(i * B) // lc.mini_batches for i in range(lc.mini_batches + 1)]
        plans = [self._micro_batches(local, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]  # on the host copy
        b = self._to_device(local)
        with tracing.span("reference_logprobs"):
            ref = self._reference_logprobs(b, plans)
        if ref is not None:
            b.ref_logprobs = ref.to(b.ref_logprobs.dtype)
        mask = b.response_mask
        self.model.train()
        # π_prox, the PPO denominator: with one update, each training forward's own (`ProximalPolicy`).
        frozen = None
        if not (lc.ppo_epochs == 1 and len(plans) == 1):
            with torch.no_grad(), tracing.span("prox_logprobs"):
                frozen = self._frozen_logprobs(b, plans)
        prox = ProximalPolicy(self.objective, b.rollout_logprobs, mask, frozen)
        counts = global_counts(mask, bounds) / alike  # every rank of a sequence-parallel group counted its rows

        def micro_loss(mini: int, micro: MicroBatch) -> tuple[torch.Tensor, dict]:
            rows = micro.rows
            logprobs, ent = self._logprobs(b, micro, with_entropy=True, replay=True)
            prox_rows, correction_rows = prox.rows_of(rows, logprobs)
            global_tokens, global_seqs = counts[mini]
            # clamp_min(1): a mini-batch all filtered out (overlong filtering) adds a zero loss, not NaN.
            return self.objective.loss(
                logprobs,
                prox_rows,
                b.ref_logprobs[rows],
                b.advantages[rows],
                mask[rows],
                correction_rows,
                ent,
                kl_coef=kl_coef,
                denominator=self.objective.denominator(global_tokens, global_seqs).clamp_min(1.0),
                token_denominator=global_tokens.clamp_min(1.0),
            )

        reduction = StepMetrics(self.device, mask, self.flops_shape, b.attention_mask.sum(1), weight=1 / alike)

        def step_values(p: Passes) -> torch.Tensor:  # with one update, every row's π_prox is in by now
            return reduction.device_values(p, prox.correction, prox.correction_metrics())

        routing = self._routing_probe(b, plans[0][0])
        passes = self._optimize(lc.ppo_epochs, plans, micro_loss, step_values)
        out = reduction.read(passes.step_values) | routing
        out["learner/grad_norm"] = passes.grad_norm
        out["learner/skipped_updates"] = float(passes.skipped)
        out["learner/lr"] = self.scheduler.get_last_lr()[0]
        out["learner/step_seconds"] = seconds = time.perf_counter() - start
        for way in ("dense", "with_attention"):  # the step's training FLOPs per second, both ways
            out[f"learner/tflops_per_s_{way}"] = out[f"learner/flops_{way}"] / seconds / 1e12
        return out

    @functools.cached_property
    def routing(self) -> LearnerRouting | None:
        """The policy's routing replay and telemetry (`learner.routing`): None for a dense model."""
        sp = None if self.sequence is None else (self.sequence.size, self.sequence.rank)
        return LearnerRouting.of(self.model, self.spec.algorithm.routing_replay, sp)

    def _routing_probe(self, b: TrainBatch, first: MicroBatch) -> dict[str, float]:
        """The step's routing telemetry, measured on its first micro-batch before it trains (MoE only)."""
        if self.routing is None:
            return {}
        self.routing.finish_step()
        with tracing.span("routing_probe"):
            return self.routing.probe(b, first, lambda: self._logprobs(b, first, with_entropy=False))

    @functools.cached_property
    def flops_shape(self) -> FlopsShape:
        """What the step's FLOPs count reads of the model (`models.flops`), found once."""
        return FlopsShape.of_model(self.model)

    # ---- weights ---------------------------------------------------------------------------
    @torch.no_grad()
    def probe_logprobs(
        self,
        prompt_ids: list[list[int]],
        response_ids: list[list[int]],
        images: list[tuple[bytes, ...]] | None = None,
    ) -> list[list[float]]:
        """Collective: the fixed sequences' fp32 log-probs an engine with the same weights should
        report (a vision-language policy's with each sequence's `images`; `probe_forward`)."""
        return probe_forward(self.model, self.device, self.images, prompt_ids, response_ids, images)

    # ---- checkpoints -------------------------------------------------------------------------
    def state_digest(self) -> str:
        """sha256 over this rank's model and optimizer shards, scheduler and step: equal digests, equal state."""
        return state_digest(self._digest_parts(), self.scheduler.state_dict(), self.step)

    def _save_host_state(self, directory: Path) -> None:
        save_host_state(directory, self.rank, self.scheduler.state_dict(), self.step, self.backend_name, self.updates)

    def _load_host_state(self, directory: Path) -> None:
        self.step, self.updates = restore_host_state(directory, self.rank, self.scheduler)
