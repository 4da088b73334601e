"""FSDP2 learner rank: shards the policy with `fully_shard`, runs the RL train step, gathers weights.

One instance per rank; the caller has initialised `torch.distributed` (gloo on CPU, nccl on
CUDA). Every rank receives its own slice of the step's batch plus the *global* counts, so the
loss denominator is the same on every rank and for every mini-batch. FSDP2 averages gradients
over ranks, so each rank scales its loss by the world size to turn that average into the sum
the global denominator expects.
"""

from __future__ import annotations

import hashlib
import random
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from rlhf_cluster.config import JobConfig
from rlhf_cluster.learner.objective import RLObjective
from rlhf_cluster.modeling import load_causal_lm, response_logprobs
from rlhf_cluster.records import TrainBatch, pad_sequences


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class FSDP2Learner:
    """One rank of the policy learner (FSDP2)."""

    def __init__(self, cfg: JobConfig, model_path: str):
        if not dist.is_initialized():
            raise RuntimeError("FSDP2Learner needs torch.distributed initialised by the caller")
        self.cfg = cfg
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = _device()
        torch.manual_seed(cfg.learner.seed)
        lc = cfg.learner
        model = load_causal_lm(model_path, torch.float32, self.device)
        if lc.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Master weights and optimizer state stay fp32; with bf16, FSDP2 all-gathers bf16 copies
        # for compute and reduces gradients in fp32.
        shard_kwargs = {"mesh": init_device_mesh(self.device.type, (self.world_size,))}
        if lc.mixed_precision == "bf16":
            shard_kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        layers = getattr(getattr(model, "model", model), "layers", [])
        for layer in layers:
            fully_shard(layer, **shard_kwargs)
        fully_shard(model, **shard_kwargs)
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lc.lr, weight_decay=lc.weight_decay)
        warmup = lc.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        # Checkpoints are written by a background thread; their collectives use their own group
        # so they never interleave with the training step's.
        self.checkpoint_group = dist.new_group(backend="gloo")
        self.bad_steps = 0
        self.objective = RLObjective(cfg.algorithm, cfg.generation.sampling.max_new_tokens)
        self.temperature = cfg.generation.sampling.temperature
        self.step = 0

    # ---- helpers ---------------------------------------------------------------------------
    def _all_reduce(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def _to_device(self, batch: TrainBatch) -> TrainBatch:
        fields = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in vars(batch).items()}
        return TrainBatch(**fields)

    def _logprobs(self, b: TrainBatch, rows: slice, with_entropy: bool):
        return response_logprobs(
            self.model,
            b.input_ids[rows],
            b.attention_mask[rows],
            b.prompt_lengths[rows],
            b.response_mask.shape[1],
            self.temperature,
            with_entropy,
        )

    # ---- the step --------------------------------------------------------------------------
    def _micro_batches(self, b: TrainBatch, lo: int, hi: int) -> list[tuple[slice, bool]]:
        """Rows [lo, hi) cut into micro-batches of at most `max_tokens_per_micro_batch` padded
        tokens, as (rows, real) pairs. Every rank runs the same number of forward/backward passes
        (FSDP2's collectives must pair up): a rank with fewer pads with `real=False` passes on one
        row, whose loss counts zero."""
        budget = self.cfg.learner.max_tokens_per_micro_batch
        if budget is None:
            return [(slice(lo, hi), True)]
        per_micro = max(1, budget // b.input_ids.shape[1])
        own = [(slice(start, min(start + per_micro, hi)), True) for start in range(lo, hi, per_micro)]
        t = torch.tensor([len(own)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return own + [(slice(lo, lo + 1), False)] * (int(t.item()) - len(own))

    def train_step(self, local: TrainBatch, kl_coef: float = 0.0) -> dict[str, float]:
        """One optimizer step per mini-batch over this rank's share of the step's batch; a
        mini-batch is accumulated over micro-batches when `max_tokens_per_micro_batch` is set."""
        start = time.perf_counter()
        b = self._to_device(local)
        lc = self.cfg.learner
        mask = b.response_mask
        B = mask.shape[0]
        self.model.train()
        bounds = [(i * B) // lc.mini_batches for i in range(lc.mini_batches + 1)]
        plans = [self._micro_batches(b, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
        # π_prox: the current weights' log-probs before any update, the PPO denominator. With one
        # epoch of one mini-batch in one pass, the training forward runs on exactly those weights,
        # so its detached log-probs are π_prox and the separate no-grad forward is skipped.
        single_pass = lc.ppo_epochs == 1 and len(plans) == 1 and len(plans[0]) == 1
        if not single_pass:
            with torch.no_grad():
                prox, _ = self._logprobs(b, slice(None), with_entropy=False)
            correction, corr_metrics = self.objective.correction_weights(prox, b.rollout_logprobs, mask)

        sums: dict[str, float] = {}
        tokens_seen, loss_total, iterations, skipped = 0.0, 0.0, 0, 0
        grad_norm = 0.0
        for _ in range(lc.ppo_epochs):
            for (lo, hi), plan in zip(zip(bounds[:-1], bounds[1:]), plans):
                m_all = mask[lo:hi]
                global_tokens, global_seqs = self._all_reduce([float(m_all.sum()), float((m_all.sum(-1) > 0).sum())])
                mini_loss = 0.0
                finite = True
                for rows, real in plan:
                    m = mask[rows]
                    logprobs, ent = self._logprobs(b, rows, with_entropy=True)
                    if single_pass:
                        prox = logprobs.detach()
                        correction, corr_metrics = self.objective.correction_weights(prox, b.rollout_logprobs, mask)
                    # max(.., 1): a mini-batch whose tokens were all filtered out (overlong
                    # filtering) contributes a zero loss rather than NaN.
                    loss, metrics = self.objective.loss(
                        logprobs,
                        prox[rows],
                        b.ref_logprobs[rows],
                        b.advantages[rows],
                        m,
                        None if correction is None else correction[rows],
                        ent,
                        kl_coef=kl_coef,
                        denominator=max(self.objective.denominator(global_tokens, global_seqs), 1.0),
                        token_denominator=max(global_tokens, 1.0),
                    )
                    if not real:
                        loss = loss * 0.0  # a padding pass: collectives only
                    # The denominators are the mini-batch's global counts, so the micro-batch
                    # losses (and their gradients, accumulated here) add up to the mini-batch's.
                    (loss * self.world_size).backward()
                    if not real:
                        continue
                    finite = finite and bool(torch.isfinite(loss.detach()))
                    mini_loss += float(loss.detach())
                    local_tokens = float(m.sum())
                    for k, v in metrics.items():
                        if k.endswith("_max"):
                            sums[k] = max(sums.get(k, float("-inf")), v)
                        else:
                            sums[k] = sums.get(k, 0.0) + v * local_tokens
                    tokens_seen += local_tokens
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), lc.max_grad_norm).full_tensor())
                # A NaN/inf loss or gradient skips the update; the norm is global, so every rank
                # takes the same decision (a NaN loss makes the gradient norm NaN too).
                if np.isfinite(grad_norm) and finite:
                    self.optimizer.step()
                else:
                    skipped += 1
                self.optimizer.zero_grad(set_to_none=True)
                loss_total += mini_loss
                iterations += 1
        self.step += 1
        if skipped == 0:
            self.scheduler.step()

        # Across ranks: token means are averaged weighted by tokens, maxima take the max, and the
        # ESS is recomputed from global sums (an average of per-rank ESS would be wrong).
        local_tok = float(mask.sum())
        means = {k: v for k, v in sums.items() if not k.endswith("_max")}
        means.update({k: v * local_tok for k, v in corr_metrics.items() if not k.endswith("_max") and k != "correction/ess"})
        maxima = {k: v for k, v in {**corr_metrics, **sums}.items() if k.endswith("_max")}
        keys = sorted(means)
        w = correction if correction is not None else torch.ones_like(mask)
        ess_sums = [float((w * mask).sum()), float((w * w * mask).sum())]
        reduced = self._all_reduce([means[k] for k in keys] + [tokens_seen, local_tok, loss_total] + ess_sums)
        total_seen, total_tok, loss_sum, w_sum, w2_sum = reduced[len(keys):]
        out = {k: reduced[i] / max(total_seen if k in sums else total_tok, 1.0) for i, k in enumerate(keys)}
        max_keys = sorted(maxima)
        t = torch.tensor([maxima[k] for k in max_keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out.update(zip(max_keys, t.tolist()))
        out["correction/ess"] = w_sum**2 / (total_tok * w2_sum) if w2_sum > 0 else 0.0
        # Each rank's loss is its share of the global-denominator loss: the sum is the loss.
        out["policy/loss"] = loss_sum / max(iterations, 1)
        out["learner/grad_norm"] = grad_norm
        out["learner/skipped_updates"] = float(skipped)
        out["learner/lr"] = self.scheduler.get_last_lr()[0]
        out["learner/tokens"] = total_tok
        out["learner/step_seconds"] = time.perf_counter() - start
        return out

    # ---- weights ---------------------------------------------------------------------------
    @torch.no_grad()
    def probe_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        """Collective (every rank runs the same forward): fp32 log-probs of fixed sequences at
        temperature 1, what an engine holding the same weights should report for them."""
        input_ids, attention_mask, prompt_lengths, T = pad_sequences(prompt_ids, response_ids)
        self.model.eval()
        logp, _ = response_logprobs(
            self.model, input_ids.to(self.device), attention_mask.to(self.device), prompt_lengths.to(self.device), T
        )
        self.model.train()
        logp = logp.float().cpu()
        return [logp[i, : len(r)].tolist() for i, r in enumerate(response_ids)]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the full (unsharded) CPU state dict on rank 0, empty on other ranks."""
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    # ---- checkpoints -------------------------------------------------------------------------
    def _rng_state(self) -> dict:
        state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def state_digest(self) -> str:
        """sha256 over this rank's model and optimizer shards, scheduler and step: equal digests, equal state."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        digest = hashlib.sha256()

        def feed(prefix: str, value) -> None:
            if isinstance(value, dict):
                for key in sorted(value, key=str):
                    feed(f"{prefix}/{key}", value[key])
            elif isinstance(value, torch.Tensor):
                local = value.to_local() if hasattr(value, "to_local") else value
                digest.update(prefix.encode())
                digest.update(local.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                digest.update(f"{prefix}={value!r}".encode())

        feed("model", model_sd)
        feed("optim", optim_sd)
        feed("scheduler", self.scheduler.state_dict())
        feed("step", self.step)
        return digest.hexdigest()

    def save_checkpoint(self, directory: str | Path) -> tuple[Future, str]:
        """Stage this rank's shards and start writing them in the background.

        Returns the write's future and the digest of the staged state. Staging copies the
        state first, so training may continue while the files are written.
        """
        directory = Path(directory)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        future = dcp.async_save(
            {"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory / "learner"),
            process_group=self.checkpoint_group,
        )
        digest = self.state_digest()
        torch.save(
            {"rng": self._rng_state(), "scheduler": self.scheduler.state_dict(), "step": self.step},
            directory / "rng" / f"rank{self.rank}.pt",
        )
        return future, digest

    def load_checkpoint(self, directory: str | Path) -> str:
        """Restore model, optimizer, scheduler, step and RNG from a checkpoint; returns the state digest."""
        directory = Path(directory)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(directory / "learner"), process_group=self.checkpoint_group)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        extra = torch.load(directory / "rng" / f"rank{self.rank}.pt", weights_only=False)
        self.scheduler.load_state_dict(extra["scheduler"])
        self.step = extra["step"]
        rng = extra["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if torch.cuda.is_available() and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"])
        return self.state_digest()

    def shard_info(self) -> dict[str, tuple[int, int]]:
        """Per parameter: (elements held by this rank, elements of the full parameter)."""
        out = {}
        for name, p in self.model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            out[name] = (local.numel(), p.numel())
        return out
