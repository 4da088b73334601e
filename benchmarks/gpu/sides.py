"""The sides the GPU learner checks time and profile: ours (the learner's `train_step` as configured
by default, or with one setting changed) and the plain loop a user would write; each built, timed
on its batches and freed before the next is built."""

from __future__ import annotations

import argparse
import gc
import time
import traceback
from pathlib import Path

import torch


class Ours:
    """The learner's train_step as configured by default (FSDP2), or with the `learner` settings
    given (LearnerConfig fields, e.g. `backend="deepspeed"`, `attention="sdpa"`, `compile=True`);
    `before`: the padded full-logits path."""

    def __init__(self, model_dir: Path, precision: str, before: bool = False, **learner):
        from rlhf_cluster.config import JobConfig
        from rlhf_cluster.learner.base import LearnerSpec

        settings = {"lr": 1e-5, "mixed_precision": precision, **learner}
        if before:
            settings["sequence_packing"] = False
        cfg = JobConfig.model_validate(
            {
                "learner": settings,
                "generation": {"sampling": {"max_new_tokens": 1024}},
                "algorithm": {"kl": {"placement": "loss", "coef": 0.01}},
                "metrics": {"enabled": False},
            }
        )
        backend = cfg.learner.backend.type
        from rlhf_cluster.learner.deepspeed import DeepSpeedLearner
        from rlhf_cluster.learner.fsdp2 import FSDP2Learner

        learner_class: type[FSDP2Learner | DeepSpeedLearner] = (
            DeepSpeedLearner if backend == "deepspeed" else FSDP2Learner
        )
        self.learner = learner_class(LearnerSpec.of_policy(cfg), str(model_dir))
        self.before = before

    def step(self, batch) -> None:
        if not self.before:
            self.learner.train_step(batch, kl_coef=0.01)
            return
        import rlhf_cluster.learner.base as base

        chunked = base.response_logprobs

        def full_logits(*a, **k):  # the path before issue 35: never chunked
            return chunked(*a, **{**k, "chunk_tokens": None})

        base.response_logprobs = full_logits
        try:
            self.learner.train_step(batch, kl_coef=0.01)
        finally:
            base.response_logprobs = chunked

    def parameters(self) -> int:
        return sum(p.numel() for p in self.learner.model.parameters())


class Plain:
    """The plain loop: fp32 master weights, bf16 autocast (CUDA), fused AdamW (CUDA), full logits."""

    def __init__(self, model_dir: Path, precision: str):
        from rlhf_cluster.models.modeling import load_causal_lm

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_causal_lm(model_dir, torch.float32, self.device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5, fused=self.device.type == "cuda")
        self.autocast = precision == "bf16"

    def step(self, batch) -> None:
        from rlhf_cluster.models.modeling import response_logprobs

        b = {k: v.to(self.device) for k, v in vars(batch).items() if isinstance(v, torch.Tensor)}
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            logp, _ = response_logprobs(
                self.model,
                b["input_ids"],
                b["attention_mask"],
                b["prompt_lengths"],
                b["response_mask"].shape[1],
                chunk_tokens=None,
            )
        mask = b["response_mask"]
        loss = -(logp * b["advantages"] * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def time_side(args: argparse.Namespace, name: str, build, batches: dict[str, object]) -> dict[str, dict]:
    """Build one side, time it on each of `batches` (`--warmup` untimed steps, then `--reps`), free
    it (and the GPU's cache) before the next side is built: sides never share the GPU's memory.
    Per batch: the step times and the peak memory, or the error that stopped it (out of memory, or
    any other: its traceback goes to the log, and the other sides still run and report)."""
    cuda = torch.cuda.is_available()
    out: dict[str, dict] = {}
    try:
        side = build()
    except Exception as e:
        return {key: {"error": _error(name, "building it", e)} for key in batches}
    try:
        for key, batch in batches.items():
            times: list[float] = []
            peak = 0
            try:
                for rep in range(-args.warmup, args.reps):
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    start = time.perf_counter()
                    side.step(batch)
                    if cuda:
                        torch.cuda.synchronize()
                        peak = max(peak, torch.cuda.max_memory_allocated())
                    seconds = time.perf_counter() - start
                    if rep >= 0:
                        times.append(seconds)
                    print(f"  {name} [{key}] rep {rep}: {seconds:.3f}s", flush=True)
                plan = getattr(getattr(side, "learner", None), "memory_plan", None)
                experts = experts_implementation(side)
                out[key] = {
                    **({"experts_implementation": experts} if experts else {}),
                    "timings": times,
                    "peak_bytes": peak if cuda else None,
                    "plan": None
                    if plan is None
                    else {"checkpointing": plan.checkpointing, "micro_batch_tokens": plan.micro_batch_tokens},
                }
            except Exception as e:
                out[key] = {"error": _error(f"{name} [{key}]", "", e)}
                if cuda:
                    torch.cuda.empty_cache()
    finally:
        del side
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return out


def _error(what: str, when: str, e: Exception) -> str:
    """A side's failure, printed (a traceback unless out of memory) and named for its figure row."""
    oom = isinstance(e, torch.OutOfMemoryError)
    kind = ("out of memory" if oom else type(e).__name__) + (f" {when}" if when else "")
    print(f"  {what}: {kind}", flush=True)
    if not oom:
        traceback.print_exc()
    return f"{kind}: {str(e)[:120]}"


def experts_implementation(side: object) -> str | None:
    """How `side`'s model runs a mixture of experts' experts (transformers 5's
    `config._experts_implementation`: `grouped_mm`, `batched_mm` or `eager`); None for a dense model."""
    from rlhf_cluster.models.moe import is_moe

    learner = getattr(side, "learner", None)  # ours; the plain loop holds its model
    model = getattr(side, "model", None) if learner is None else getattr(learner.model, "module", learner.model)
    config = getattr(model, "config", None)
    if config is None or not is_moe(config):
        return None
    return getattr(config, "_experts_implementation", None)


def op_counts(side: Ours, batch) -> dict[str, float]:
    """aten operations of one step of `side` (on the CPU: what a GPU would launch, before any
    fusion), and those inside the decoder layers' forward, per layer call (a layer per micro-batch)."""
    from rlhf_cluster.telemetry.op_counts import count_ops

    inner = getattr(side.learner.model, "module", side.learner.model)
    with count_ops(inner.model.layers) as counts:
        side.step(batch)
    return {
        "aten_ops_per_step": counts.total,
        "copies_per_step": counts.copies,
        "forward_aten_ops_per_decoder_layer_per_micro_batch": counts.per_layer_call,
        "decoder_layer_forward_calls": counts.layer_calls,
    }
