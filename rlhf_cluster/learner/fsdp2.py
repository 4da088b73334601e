"""FSDP2 learner rank: shards the policy with `fully_shard`, steps torch's AdamW, gathers weights.

The RL step itself (micro-batches, global loss denominators, metrics) is `LearnerBase`'s; this
module owns sharding, clipping/stepping and the distributed-checkpoint files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from rlhf_cluster.learner.base import LearnerBase
from rlhf_cluster.learner.gather import gathered_to
from rlhf_cluster.learner.host_state import check_written_by
from rlhf_cluster.learner.images import EngineNames, freeze_vision
from rlhf_cluster.learner.sequence_groups import sequence_group
from rlhf_cluster.learner.spec import LearnerSpec
from rlhf_cluster.models.compiled import compile_layers
from rlhf_cluster.models.liger import apply_liger
from rlhf_cluster.models.lora import adapter_file_name, apply_lora, is_adapter_param, merged_lora_tensors
from rlhf_cluster.models.modeling import decoder_layers, learner_attention, load_causal_lm, tied_output_names
from rlhf_cluster.models.sequence_parallel import enable_sequence_parallel


class FSDP2Learner(LearnerBase):
    """One rank of the policy learner (FSDP2)."""

    backend_name = "fsdp2"

    def __init__(self, spec: LearnerSpec, model_path: str):
        super().__init__(spec)
        lc = spec.learner
        model = self._load_model(model_path)
        self._set_up_vision(model, model_path)
        if lc.sequence_parallel > 1:  # each rank of a group runs 1/N of every packed row (`sequence_groups`)
            self.sequence = sequence_group(lc.sequence_parallel)
            enable_sequence_parallel(model, lc.sequence_parallel, self.device)  # on CUDA: no dense-mask attention
        # compiled layers fuse the norms themselves, and dynamo cannot trace Liger's (config: _compile_without_liger)
        self.liger = apply_liger(model, self.device, False if lc.compile else lc.liger_kernels)
        plan = self._plan_memory(model_path)
        if plan.checkpointing:
            # An HF model's (or ValueModel's) method, which torch's Module.__getattr__ types as Tensor | Module.
            model.gradient_checkpointing_enable(  # type: ignore[operator]  # torch's Module.__getattr__ typing
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        base = model
        if lc.lora.enabled:
            model = apply_lora(model, lc.lora)
        # With LoRA the frozen base weights are never saved or hashed: they are the model folder's.
        self.state_options = StateDictOptions(ignore_frozen_params=lc.lora.enabled)
        # Master weights and optimizer state stay fp32; with bf16, FSDP2 all-gathers bf16 copies
        # for compute and reduces gradients in fp32.
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        mp_policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if lc.mixed_precision == "bf16"
            else MixedPrecisionPolicy()  # fully_shard's default: no casting
        )
        layers = decoder_layers(base)  # a vision-language model's vision blocks stay in the root unit
        if lc.compile:
            compile_layers(layers, self.device)
        # Where the plan keeps them (one rank), a layer holds its gathered (bf16) weights from its
        # forward to its backward: one gather and cast per micro-batch, not two (memory_plan).
        reshard = not plan.keep_gathered
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, mp_policy=mp_policy)
        if self.images is not None and not lc.freeze_vision:
            reduce_unused_params(cast(FSDPModule, model), self.world_size)
        self.model = model
        trainable = [p for p in model.parameters() if p.requires_grad]
        # Fused on CUDA (one kernel for every parameter), foreach on CPU (None: AdamW's default).
        cuda = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            trainable,
            lr=lc.lr,
            weight_decay=lc.weight_decay,
            fused=True if cuda else None,
            foreach=None if cuda else True,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: spec.lr_factor(step)
        )  # `lr_schedule`
        # Checkpoints are written by a background thread; their collectives use their own group
        # so they never interleave with the training step's.
        self.checkpoint_group = dist.new_group(backend="gloo")

    def _set_up_vision(self, model: torch.nn.Module, model_path: str) -> None:
        """A vision-language policy's processor and frozen tower (before sharding: the optimizer
        takes the trainable parameters), and what leaves for the engines: the folder's names, a
        frozen vision tower never."""
        lc = self.spec.learner
        self.images = self.spec.images_of(model_path)
        if self.images is not None and lc.freeze_vision:
            freeze_vision(model)
        self.engine_names = EngineNames.of(model, self.images is not None and lc.freeze_vision)
        if self.images is not None and lc.sequence_parallel > 1:
            raise ValueError("learner.sequence_parallel splits packed rows, and rows with images are not packed: use 1")

    def _load_model(self, model_path: str) -> torch.nn.Module:
        """The fp32 model to shard (the critic overrides it with its value model); it exposes its
        decoder `layers` (directly or under `.model`) so each layer is sharded on its own."""
        lc = self.spec.learner
        attention = learner_attention(
            lc.attention, self.device, self.spec.max_new_tokens, lc.mixed_precision, model_path
        )
        return load_causal_lm(model_path, torch.float32, self.device, attention)

    # ---- the step --------------------------------------------------------------------------
    def _backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        # FSDP2 accumulates into the sharded .grad across backward calls until zero_grad.
        loss.backward()

    def _clip_and_step(self, loss: torch.Tensor, also_read: torch.Tensor) -> tuple[float, bool, list[float]]:
        total_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.spec.learner.max_grad_norm)
        norm = cast(DTensor, total_norm).full_tensor()  # FSDP2's parameters are DTensors, so is their norm
        # The update's one wait for the device: the norm, the loss and what the caller reads along.
        grad_norm, *values = torch.cat([norm.reshape(1).double(), loss.reshape(1).double(), also_read]).tolist()
        # A NaN/inf loss or gradient skips the update; the norm is global, so every rank takes
        # the same decision (a NaN loss makes the gradient norm NaN too).
        applied = bool(np.isfinite(grad_norm) and np.isfinite(values[0]))
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, applied, values

    # ---- weights ---------------------------------------------------------------------------
    def named_full_tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Collective generator: each parameter all-gathered on its own (`DTensor.full_tensor`),
        so no rank holds more than one full tensor beyond what rank 0's consumer keeps; with LoRA
        the merged weights under the base model's names, merged a decoder layer at a time (in
        fp32, so with LoRA the cast to `dtype` follows the merge, on the host)."""
        if dtype is None:
            return self._full_tensors(None)
        return self.engine_names.renamed(
            (name, tensor) for name, tensor in self._full_tensors(dtype) if self.engine_names.sent(name)
        )

    def _full_tensors(self, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
        """`named_full_tensors` under the learner's names (with `dtype`, a frozen vision tower
        left out before it is gathered)."""
        tied = tied_output_names(self.model) if dtype is not None else set()
        lora = self.spec.learner.lora
        if not lora.enabled:
            return self._gathered_tensors(dtype, skip=tied, keep=None if dtype is None else self.engine_names.sent)
        merged = merged_lora_tensors(self._gathered_tensors(None, skip=tied), lora.alpha / lora.rank)
        return merged if dtype is None else ((n, t.to(dtype) if t.is_floating_point() else t) for n, t in merged)

    def deals_engine_tensors(self) -> bool:
        return not self.spec.learner.lora.enabled  # LoRA merges on rank 0 (or sends adapters alone)

    def named_engine_tensors(
        self, dtype: torch.dtype, owner: Callable[[str, torch.Tensor], int] | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        if self.spec.learner.lora.enabled and owner is not None:
            raise NotImplementedError("a LoRA learner's tensors leave from rank 0")
        if not self.spec.learner.lora.enabled:  # left on the device: the packer copies them to pinned host memory
            names = self.engine_names
            return names.renamed(
                self._gathered_tensors(
                    dtype, skip=tied_output_names(self.model), keep=names.sent, owner=owner, on_device=True
                )
            )
        if not self.spec.learner.lora.adapters_only:
            return self.named_full_tensors(dtype)
        # Only the adapters are gathered: the base weights never leave the ranks.
        adapters = self._gathered_tensors(dtype, skip=set(), keep=is_adapter_param)
        return ((adapter_file_name(name), tensor) for name, tensor in adapters)

    def _gathered_tensors(
        self,
        dtype: torch.dtype | None,
        skip: set[str],
        keep: Callable[[str], bool] | None = None,
        owner: Callable[[str, torch.Tensor], int] | None = None,
        on_device: bool = False,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Each parameter gathered to the rank that sends it alone (`owner(name, tensor)`, asked
        on every rank in order; None: rank 0), see `gather.gathered_to`."""
        for name, tensor in self.model.state_dict().items():
            if name in skip or (keep is not None and not keep(name)):  # the same on every rank: no gather unmatched
                continue
            sender = 0 if owner is None else owner(name, tensor)
            if isinstance(tensor, DTensor):
                full = gathered_to(tensor, sender)  # every rank takes part
                if full is None:
                    continue
            elif self.rank != sender:
                continue
            else:
                full = tensor
            out = full.detach()
            if dtype is not None and out.is_floating_point():
                out = out.to(dtype)  # on the device: only the engine's bytes leave it
            if on_device and out.is_cuda:
                yield name, out  # read (copied to the host) before the transport's publish returns
            else:
                # A plain (unsharded) parameter is the live one: the consumer gets a copy, never a view of it.
                yield name, out.to("cpu", copy=not isinstance(tensor, DTensor) and out.data_ptr() == tensor.data_ptr())

    @torch.no_grad()
    def _reference_logprobs(self, b, plans):
        """With LoRA, the reference is the base model: the same passes with the adapters disabled."""
        if not self.spec.learner.lora.enabled:
            return None
        with self.model.disable_adapter():  # the base model routes itself: no replay of the policy's experts
            return self._frozen_logprobs(b, plans, replay=False)

    # ---- checkpoints -------------------------------------------------------------------------
    def _digest_parts(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self.state_options)
        self._drop_unstepped_optimizer_state()  # `optim_sd` keeps the tensors hashed
        return {"model": model_sd, "optim": optim_sd}

    def reset_optimizer(self) -> None:
        self.optimizer.state.clear()
        self.updates = 0  # a checkpoint before the next update keeps no made-up state either

    def _drop_unstepped_optimizer_state(self) -> None:
        """Before this learner's first applied update (a policy held by a critic warm-up,
        `critic.freeze_policy_steps`, or whose updates a non-finite loss skipped so far), forget
        the state `get_state_dict` made up: torch gives an optimizer without state one by a
        zero-gradient step at lr 0 (`_init_optim_state`), AdamW's step count 1 with zero moments,
        which would make the first real update ~0.74x its size. Called once the state is staged
        and hashed (save), or restored and hashed (load), so the optimizer is as if no checkpoint
        or digest was taken (AdamW makes its state at its first step) and a checkpoint's digest is
        the same on both sides."""
        if self.updates == 0:
            self.optimizer.state.clear()

    def save_checkpoint(self, directory: str | Path) -> tuple[Future, str]:
        """Stage this rank's shards and start writing them in the background.

        Returns the write's future and the digest of the staged state. Staging copies the
        state first, so training may continue while the files are written.
        """
        directory = Path(directory)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self.state_options)
        future = dcp.async_save(
            {"model": model_sd, "optim": optim_sd},
            checkpoint_id=str(directory / "learner"),
            process_group=self.checkpoint_group,
        )
        if not isinstance(future, Future):  # an AsyncSaveResponse comes only with an asynchronous stager
            raise RuntimeError(f"dcp.async_save returned {type(future).__name__}, not the write's Future")
        digest = self.state_digest()  # after the staging copy: drops a state made up for it at step 0
        self._save_host_state(directory)
        return future, digest

    def load_checkpoint(self, directory: str | Path) -> str:
        """Restore model, optimizer, scheduler, step and RNG from a checkpoint; returns the state digest."""
        directory = Path(directory)
        check_written_by(directory, directory / "learner" / ".metadata", self.rank, self.backend_name)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self.state_options)
        state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}  # dcp.load's type; filled in place
        dcp.load(state, checkpoint_id=str(directory / "learner"), process_group=self.checkpoint_group)
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=self.state_options,
        )
        self._load_host_state(directory)
        return self.state_digest()  # at step 0 drops the made-up state restored (see `_digest_parts`)

    def shard_info(self) -> dict[str, tuple[int, int]]:
        """Per parameter: (elements held by this rank, elements of the full parameter)."""
        out = {}
        for name, p in self.model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            out[name] = (local.numel(), p.numel())
        return out


def reduce_unused_params(model: FSDPModule, world_size: int) -> None:
    """A trained vision tower is unused by a pass without images: on several ranks FSDP2 must
    reduce-scatter its zero gradients there, so every rank's collectives stay alike. One rank has
    nothing to keep in step (torch 2.11's FSDP2, on the lent H200, has no such setting)."""
    if world_size == 1:
        return
    setter = getattr(model, "set_reduce_scatter_unused_params", None)
    if setter is None:
        raise ValueError(
            f"learner.freeze_vision: false on {world_size} ranks needs FSDP2's set_reduce_scatter_unused_params, "
            f"which torch {torch.__version__} does not have: train the vision tower on one rank "
            "(learner.world_size: 1) or keep learner.freeze_vision: true"
        )
    setter(True)
