"""DeepSpeed ZeRO learner rank (stage 3 by default): the same RL step as FSDP2, on a DeepSpeed engine.

The RL step itself (micro-batches, global loss denominators, metrics) is `LearnerBase`'s; this
module owns the engine, the backward/step mechanics, gathering weights and the checkpoint files.

How the update is made equal to FSDP2's:
- DeepSpeed is told one micro-batch per rank and no accumulation of its own
  (`gradient_accumulation_steps: 1`), so `engine.backward` does not divide the loss; the learner
  marks the last micro-batch of a mini-batch with `set_gradient_accumulation_boundary`, and ZeRO
  accumulates the reduced gradient partitions over the micro-batches until `engine.step()`.
- DeepSpeed averages gradients over the data-parallel ranks, as FSDP2 does; the base class scales
  each rank's loss by the world size, so the sum over ranks is the global-denominator loss's gradient.
- Clipping is DeepSpeed's `gradient_clipping` = `learner.max_grad_norm` (the same
  `max_norm / (norm + 1e-6)` factor as torch's `clip_grad_norm_`). A non-finite global gradient
  norm makes ZeRO skip the step on every rank; `engine.was_step_applied()` reports it.
- The optimizer is torch's AdamW over ZeRO's fp32 partitions (no DeepSpeed op to compile), with
  `learner.lr`/`weight_decay`; the LR schedule is the same LambdaLR as FSDP2's, on that AdamW.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from rlhf_cluster.fileio import done_future
from rlhf_cluster.learner.base import LearnerBase
from rlhf_cluster.learner.deepspeed_config import engine_config
from rlhf_cluster.learner.host_state import check_written_by
from rlhf_cluster.learner.images import EngineNames, freeze_vision
from rlhf_cluster.learner.spec import LearnerSpec
from rlhf_cluster.models.liger import apply_liger
from rlhf_cluster.models.modeling import learner_attention, load_causal_lm
from rlhf_cluster.models.vision import checkpoint_name

CHECKPOINT_TAG = "deepspeed"


def _as_tree(value: Any) -> Any:
    """`value` with lists turned into index-keyed dicts (so every tensor inside is hashed by its
    bytes); None for objects that are not plain data."""
    if isinstance(value, dict):
        return {k: t for k, t in ((k, _as_tree(v)) for k, v in value.items()) if t is not None}
    if isinstance(value, (list, tuple)):
        return {i: _as_tree(v) for i, v in enumerate(value)}
    if value is None or isinstance(value, (torch.Tensor, int, float, bool, str)):
        return value
    return None


def _skip_shared_memory_allreduce_build() -> None:
    """Tell DeepSpeed its CPU shared-memory all-reduce op is unavailable, so joining the group does
    not compile it. DeepSpeed builds that op (`deepspeed_shm_comm`, a C++ extension) the first time
    a process on a CPU joins a group, whether or not anything calls it; only its
    `inference_all_reduce` does, and training never does (ZeRO's collectives go through
    torch.distributed's gloo group). The build took ~40 s of a 2-core machine at the first DeepSpeed
    start of every fresh machine (CI's first DeepSpeed test; a user's first CPU run)."""
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__  # probed on first access, then kept by the module
    compatible["deepspeed_shm_comm"] = False


def _full_param(param: torch.nn.Parameter) -> torch.Tensor:
    """Collective: a parameter whole, its fp32 master weights where it trains; a frozen one (a
    frozen vision tower: ZeRO keeps no master for it) gathered from its partitions as it is."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    if param.requires_grad:
        return safe_get_full_fp32_param(param)
    with deepspeed.zero.GatheredParameters([param]):  # stages 1-2 hold it whole: no gather
        return param.data.detach().clone()


class DeepSpeedLearner(LearnerBase):
    """One rank of the policy learner (DeepSpeed ZeRO, stage `learner.backend.zero_stage`)."""

    backend_name = "deepspeed"

    def __init__(self, spec: LearnerSpec, model_path: str):
        super().__init__(spec)
        # DeepSpeed reads its device index from LOCAL_RANK. Every rank actor sees exactly one
        # device (Ray sets CUDA_VISIBLE_DEVICES), index 0, as `join_process_group` assumes too.
        os.environ.setdefault("LOCAL_RANK", "0")
        import deepspeed  # imported here: the FSDP2 path must not pay for (or need) deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if self.device.type == "cpu":
            _skip_shared_memory_allreduce_build()
        lc = spec.learner
        # The model is built in full, then partitioned by `deepspeed.initialize` (ZeRO-3's
        # `zero.Init` around `from_pretrained` fails without `accelerate`).
        attention = learner_attention(lc.attention, self.device, spec.max_new_tokens, lc.mixed_precision, model_path)
        model = load_causal_lm(model_path, torch.float32, self.device, attention)
        self.images = spec.images_of(model_path)
        if self.images is not None and self.world_size > 1:
            # ZeRO-3 gathers a module's weights as it runs, and a rank whose pass has no image
            # never runs the vision tower: the ranks' collectives would part (measured, 2 ranks).
            raise ValueError("a vision-language policy on more than one DeepSpeed rank: use learner.backend: fsdp2")
        if self.images is not None and lc.freeze_vision:
            freeze_vision(model)
        self.engine_names = EngineNames.of(model, self.images is not None and lc.freeze_vision)
        self.liger = apply_liger(model, self.device, lc.liger_kernels)
        plan = self._plan_memory(model_path)
        if plan.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ds_config, adamw_kwargs = engine_config(lc, self.world_size)
        self.ds_config = ds_config
        adamw = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **adamw_kwargs)
        # With bf16, DeepSpeed casts the model to bf16 and builds the fp32 master weights from
        # that cast, which would round the initial weights to bf16 once. Keep the fp32 values
        # (references, no copy: the cast swaps in new tensors) and restore the masters from them.
        initial_fp32 = {name: p.data for name, p in model.named_parameters()} if lc.mixed_precision == "bf16" else {}
        # deepspeed.initialize joins the existing torch.distributed group (it does not start one).
        self.model, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=adamw, config=ds_config)
        from rlhf_cluster.learner.deepspeed_checkpoint import use_weights_only_loading

        use_weights_only_loading(self.model)  # DeepSpeed's own engine unpickles checkpoint files
        if initial_fp32:
            from deepspeed.utils import safe_set_full_fp32_param

            for name, param in self.model.module.named_parameters():
                safe_set_full_fp32_param(param, initial_fp32[name])  # this rank's slice of it
            del initial_fp32
        # ZeRO swaps AdamW's parameters for its fp32 partitions but keeps the param groups, so
        # the schedule drives the lr the wrapped optimizer uses.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            adamw, lambda step: spec.lr_factor(step)
        )  # `learner.lr_schedule`

    # ---- the step --------------------------------------------------------------------------
    def _backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        # The boundary must be set before backward: ZeRO decides there whether to finish the
        # gradient reduction for the step.
        self.model.set_gradient_accumulation_boundary(last_micro_batch)
        self.model.backward(loss)

    def _clip_and_step(self, loss: torch.Tensor, also_read: torch.Tensor) -> tuple[float, bool, list[float]]:
        # A non-finite loss gives a non-finite gradient, hence a non-finite global norm, which
        # ZeRO detects on every rank alike: the step is skipped and the gradients cleared. The
        # decision is ZeRO's, on the global norm (the loss is not consulted): the gradients are
        # already reduced into ZeRO's partitions, and there is no public way to drop them without
        # a step. (ZeRO reads its own overflow flag and norm from the device inside `step`.)
        self.model.step()
        norm = self.model.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")
        values = torch.cat([loss.reshape(1).double(), also_read]).tolist()
        return grad_norm, bool(self.model.was_step_applied()), values

    # ---- weights ---------------------------------------------------------------------------
    def _named_state_tensors(self) -> list[tuple[str, Any]]:
        """(state-dict name, parameter or buffer) in `state_dict()` order, names as HF/FSDP2 use them."""
        module = self.model.module
        params = dict(module.named_parameters(remove_duplicate=False))
        buffers = dict(module.named_buffers(remove_duplicate=False))
        return [(name, params.get(name, buffers.get(name))) for name in module.state_dict().keys()]

    def named_full_tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Collective generator: ZeRO's fp32 master weights gathered one parameter at a time
        (every rank takes part in each gather; rank 0 gets them). With `dtype`, cast on the
        device and a tied tensor under its first name only, under the model folder's names, a frozen
        vision tower left out (see `LearnerBase.named_full_tensors`)."""
        named = self._named_state_tensors()
        uses = Counter(id(tensor) for _, tensor in named)
        tied: dict[int, torch.Tensor] = {}  # fp32 callers: a tied weight is gathered once, kept until its last name
        seen: set[int] = set()
        for name, tensor in named:
            if dtype is not None and not self.engine_names.sent(name):
                continue  # the same on every rank: no gather unmatched
            if isinstance(tensor, torch.nn.Parameter):
                key = id(tensor)
                uses[key] -= 1
                if key in seen and dtype is not None:
                    continue  # tied: the engine ties it itself, it crosses to the host once
                full = tied.pop(key) if key in tied else _full_param(tensor)
                seen.add(key)
                if uses[key] > 0 and dtype is None:
                    tied[key] = full
            else:
                full = tensor  # buffers are not partitioned
            if self.rank == 0:
                wanted = (dtype or torch.float32) if full.is_floating_point() else full.dtype
                sent = name if dtype is None else checkpoint_name(name, self.engine_names.model_type)
                yield sent, full.detach().to(wanted).to("cpu", copy=True)  # cast on the device, then a host copy

    # ---- checkpoints -------------------------------------------------------------------------
    def _local_model_tensor(self, param: torch.nn.Parameter) -> torch.Tensor:
        # Stage 3 keeps only this rank's partition (`ds_tensor`); stages 1-2 the whole parameter.
        return param.ds_tensor if hasattr(param, "ds_tensor") else param.data

    def _digest_parts(self) -> dict[str, Any]:
        model = {name: self._local_model_tensor(param) for name, param in self.model.module.named_parameters()}
        # ZeRO's optimizer state of this rank, as `engine.save_checkpoint` writes it: the fp32
        # master partitions and AdamW's moments and step counts over them. Objects without a
        # stable value (the loss scaler, constant 1 without fp16) are left out.
        optim = {k: _as_tree(v) for k, v in self.model.optimizer.state_dict().items() if _as_tree(v) is not None}
        return {"model": model, "optim": optim}

    def save_checkpoint(self, directory: str | Path) -> tuple[Future, str]:
        """Write this rank's partition (model, fp32 master weights, optimizer state) with
        `engine.save_checkpoint`, plus the RNG/scheduler/step file.

        DeepSpeed's writer is collective and synchronous (it cannot run on a thread beside the
        training step's collectives), so the files are complete when this returns and the
        future is already done. Returns the future and the saved state's digest.
        """
        directory = Path(directory)
        self.model.save_checkpoint(str(directory / "learner"), tag=CHECKPOINT_TAG, save_latest=False)
        digest = self.state_digest()
        self._save_host_state(directory)
        return done_future(), digest

    def load_checkpoint(self, directory: str | Path) -> str:
        """Restore model, optimizer, scheduler, step and RNG from a checkpoint; returns the state digest."""
        directory = Path(directory)
        check_written_by(directory, directory / "learner" / CHECKPOINT_TAG, self.rank, self.backend_name)
        path, _ = self.model.load_checkpoint(
            str(directory / "learner"), tag=CHECKPOINT_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise RuntimeError(
                f"checkpoint {directory}: DeepSpeed could not load {directory / 'learner' / CHECKPOINT_TAG}"
            )
        self._load_host_state(directory)
        return self.state_digest()

    def shard_info(self) -> dict[str, tuple[int, int]]:
        """Per parameter: (elements held by this rank, elements of the full parameter)."""
        out = {}
        for name, param in self.model.module.named_parameters():
            if hasattr(param, "ds_tensor"):
                out[name] = (int(getattr(param.ds_tensor, "ds_numel", param.ds_tensor.numel())), int(param.ds_numel))
            else:
                out[name] = (param.numel(), param.numel())
        return out
