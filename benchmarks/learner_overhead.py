"""Learner overhead: `FSDP2Learner.train_step` (ours) vs a minimal hand-written torch loop, same loss.

All sides train their own copy of the same random model (same initial weights) on the same
batch, in this process, one after another:

- `ours`: `FSDP2Learner.train_step(batch, kl_coef)` at world size 1 (torch.distributed
  initialised here with gloo on a free port): FSDP2-wrapped model, a no-grad forward for π_prox,
  TIS weights, the clipped policy loss + k3 KL from `RLObjective`, entropy, global-denominator
  all-reduces, clip_grad_norm, AdamW step, metrics.
- `hand`: a plain HF model and AdamW, one forward: log-probs gathered from the logits, π_prox
  taken as the detached log-probs of that same forward (exact for one epoch and one mini-batch:
  the weights have not moved yet), token-level TIS `min(exp(π_prox - π_roll), cap)`, clipped
  ratio, token mean, + coef * k3 KL, backward, clip_grad_norm, step.
- `hand_prox`: `hand` plus a separate no-grad forward for π_prox, as the library does (it needs
  one for ppo_epochs or mini_batches > 1): it tells how much of the gap is that forward and
  how much is the rest (FSDP2, metrics, entropy, collectives).

The first call of each side starts from the same weights, so their losses are compared (they
must agree: it proves the hand loop computes the same loss). Then the calls alternate with the
order rotated every repetition; medians are reported, every timing goes to the JSON.

    .venv/bin/python -m benchmarks.learner_overhead [--hidden 256 --layers 4 --batch 32 --response-len 64 ...]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from benchmarks._timing import median, medians, rotated
from benchmarks.common import (
    HEAD_DIM,
    free_port,
    headline,
    machine_info,
    model_parser,
    parse_model_args,
    print_table,
    qwen2_shape,
    random_sample,
    write_result,
)
from rlhf_cluster.config import JobConfig
from rlhf_cluster.experience.records import TrainBatch
from rlhf_cluster.learner.base import LearnerSpec
from rlhf_cluster.learner.fsdp2 import FSDP2Learner
from rlhf_cluster.models.modeling import load_causal_lm, response_logprobs
from rlhf_cluster.models.tiny_model import ensure_tiny_model

SIDES = ("ours", "hand", "hand_prox")
TARGET = 0.10  # ours may take at most 10% longer per step than the minimal hand loop


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = model_parser(__doc__, "learner_overhead", hidden=256, layers=4, reps=6, warmup=1, unit="steps")
    p.add_argument("--batch", type=int, default=32, help="samples per step")
    p.add_argument("--prompt-len", type=int, default=16, help="longest prompt (prompts are 8..this tokens)")
    p.add_argument("--response-len", type=int, default=64, help="longest response (responses are len/2..len tokens)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (small: the batch stays near on-policy)")
    p.add_argument("--kl-coef", type=float, default=0.01, help="coefficient of the k3 KL term in the loss")
    args = parse_model_args(p, argv)
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first warmup step checks the losses agree)")
    return args


def make_batch(model, args, vocab: int, seed: int = 0) -> TrainBatch:
    """Random prompts/responses; rollout log-probs = the model's own + a little noise (a realistic mismatch)."""
    rng = random.Random(seed)
    samples = []
    for i in range(args.batch):
        plen = rng.randint(8, args.prompt_len)
        rlen = rng.randint(args.response_len // 2, args.response_len)
        samples.append(random_sample(rng, i, plen, rlen, vocab, 0.0, "length"))
    batch = TrainBatch.from_samples(samples)
    with torch.no_grad():
        true, _ = response_logprobs(
            model, batch.input_ids, batch.attention_mask, batch.prompt_lengths, batch.response_mask.shape[1]
        )
    gen = torch.Generator().manual_seed(seed)
    noise = 0.05 * torch.randn(true.shape, generator=gen)
    batch.rollout_logprobs = ((true + noise) * batch.response_mask).float()
    batch.ref_logprobs = (true * batch.response_mask).float()
    return batch


class HandLoop:
    """The minimal loop: plain HF model, AdamW, the demo's loss (token_mean, clip 0.2, token TIS cap 2, k3 KL)."""

    def __init__(self, model_path: str, cfg: JobConfig, kl_coef: float, separate_prox: bool):
        torch.manual_seed(cfg.learner.seed)
        self.model = load_causal_lm(model_path, torch.float32, "cpu")
        lc = cfg.learner
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lc.lr, weight_decay=lc.weight_decay)
        self.max_grad_norm = lc.max_grad_norm
        a = cfg.algorithm
        self.clip_low, self.clip_high, self.cap = a.loss.clip_low, a.loss.clip_high, a.correction.cap
        self.kl_coef = kl_coef
        self.separate_prox = separate_prox

    def _logprobs(self, b: TrainBatch) -> torch.Tensor:
        logits = self.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
        B, L = b.input_ids.shape
        T = b.response_mask.shape[1]
        pos = (b.prompt_lengths[:, None] - 1 + torch.arange(T)[None, :]).clamp(max=L - 2)
        targets = b.input_ids.gather(1, pos + 1)
        picked = logits.gather(1, pos[:, :, None].expand(B, T, logits.shape[-1])).float()
        return picked.log_softmax(-1).gather(-1, targets[:, :, None]).squeeze(-1)

    def step(self, b: TrainBatch) -> float:
        self.model.train()
        if self.separate_prox:
            with torch.no_grad():
                prox = self._logprobs(b)
        logp = self._logprobs(b)
        if not self.separate_prox:
            prox = logp.detach()
        m = b.response_mask
        n = m.sum().clamp_min(1)
        w = torch.where(m.bool(), torch.exp((prox - b.rollout_logprobs).clamp(-20, 20)).clamp(max=self.cap), 0.0)
        ratio = torch.exp(logp - prox)
        adv = b.advantages
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - self.clip_low, 1 + self.clip_high)) * w
        log_r = (b.ref_logprobs - logp).clamp(-20, 20)
        kl = torch.exp(log_r) - 1 - log_r
        loss = (pg * m).sum() / n + self.kl_coef * (kl * m).sum() / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kv_heads = max(1, args.hidden // HEAD_DIM // 2)
    tiny = qwen2_shape(args.hidden, args.layers, kv_heads, positions=max(256, args.prompt_len + args.response_len + 8))
    model_dir = str(ensure_tiny_model(tiny, args.cache_dir))
    run_dir = tempfile.mkdtemp(prefix="bench-learner-")
    cfg = job_config(args, model_dir, run_dir)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        timings, first_loss, shape = time_sides(args, cfg, model_dir)
    finally:
        dist.destroy_process_group()
        shutil.rmtree(run_dir, ignore_errors=True)

    keys = ("seconds", "cpu_seconds", "tokens_per_s")
    med = medians(timings, keys)
    overhead = med["ours"]["seconds"] / med["hand"]["seconds"] - 1.0
    paired = [o["tokens_per_s"] / h["tokens_per_s"] for o, h in zip(timings["ours"], timings["hand"])]
    loss_diff = max(abs(first_loss[s] - first_loss["ours"]) for s in SIDES)
    result = {
        "benchmark": "learner_overhead",
        "machine": machine_info(),
        "config": {
            **{k: v for k, v in vars(args).items() if k != "out"},
            "tiny_model": tiny.model_dump(),
            "model_dir": model_dir,
            "algorithm": cfg.algorithm.model_dump(),
            "batch_shape": shape["batch_shape"],
            "response_tokens": shape["tokens"],
            "world_size": 1,
            "backend": "gloo",
        },
        "timings": timings,
        "medians": med,
        "first_step_loss": first_loss,
        "first_step_loss_max_abs_diff": loss_diff,
        "ratio_ours_over_hand_tokens_per_s": med["ours"]["tokens_per_s"] / med["hand"]["tokens_per_s"],
        "ratio_ours_over_hand_prox_tokens_per_s": med["ours"]["tokens_per_s"] / med["hand_prox"]["tokens_per_s"],
        "overhead_vs_hand": overhead,
        "overhead_vs_hand_prox": med["ours"]["seconds"] / med["hand_prox"]["seconds"] - 1.0,
        "cpu_time_overhead_vs_hand": med["ours"]["cpu_seconds"] / med["hand"]["cpu_seconds"] - 1.0,
        "paired_ratios_ours_over_hand": paired,
        "median_paired_ratio": median(paired),
        "headline": headline(
            "learner step overhead vs minimal torch loop", overhead, f"<= {TARGET:.0%}", overhead <= TARGET, "fraction"
        ),
    }
    print_report(args, result, shape["parameters"])
    write_result(args.out, result)
    if loss_diff > 1e-4:
        print(f"ERROR: the sides computed different first-step losses (max |diff| {loss_diff:.2e})", file=sys.stderr)
        return 1
    return 0


def job_config(args: argparse.Namespace, model_dir: str, run_dir: str) -> JobConfig:
    """The demo's algorithm: GRPO advantages, token-mean clipped loss, token TIS cap 2, k3 KL in the loss."""
    return JobConfig.model_validate(
        {
            "name": "bench",
            "run_dir": run_dir,
            "model": {"path": model_dir},
            "generation": {"sampling": {"n": 4, "max_new_tokens": args.response_len, "temperature": 1.0}},
            "algorithm": {
                "advantage": "grpo",
                "loss": {"aggregation": "token_mean"},
                "kl": {"placement": "loss", "estimator": "k3", "coef": args.kl_coef},
                "correction": {"enabled": True, "level": "token", "mode": "truncate", "cap": 2.0},
            },
            "learner": {"world_size": 1, "lr": args.lr},
            "metrics": {"enabled": False},
        }
    )


def time_sides(args: argparse.Namespace, cfg: JobConfig, model_dir: str) -> tuple[dict, dict, dict]:
    """Every side's step on the same batch, the order rotated each repetition: per side one row per
    timed step; each side's first loss; the batch's shape, response tokens and the model's parameters."""
    ours = FSDP2Learner(LearnerSpec.of_policy(cfg), model_dir)
    hand = HandLoop(model_dir, cfg, args.kl_coef, separate_prox=False)
    hand_prox = HandLoop(model_dir, cfg, args.kl_coef, separate_prox=True)
    batch = make_batch(hand.model, args, hand.model.config.vocab_size)
    tokens = int(batch.response_mask.sum())

    def run_ours() -> float:
        return ours.train_step(batch, args.kl_coef)["policy/loss"]

    run = {"ours": run_ours, "hand": lambda: hand.step(batch), "hand_prox": lambda: hand_prox.step(batch)}
    first_loss: dict[str, float] = {}
    timings: dict[str, list[dict]] = {s: [] for s in SIDES}
    for rep in range(-args.warmup, args.reps):
        order = rotated(SIDES, rep)
        for side in order:
            start, cpu_start = time.perf_counter(), time.process_time()
            loss = run[side]()
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            first_loss.setdefault(side, loss)
            if rep >= 0:
                timings[side].append(
                    {
                        "rep": rep,
                        "position": order.index(side),
                        "seconds": seconds,
                        "cpu_seconds": cpu_seconds,
                        "tokens": tokens,
                        "tokens_per_s": tokens / seconds,
                        "loss": loss,
                    }
                )
    shape = {
        "batch_shape": list(batch.input_ids.shape),
        "tokens": tokens,
        "parameters": sum(p.numel() for p in hand.model.parameters()),
    }
    return timings, first_loss, shape


def print_report(args: argparse.Namespace, result: dict, parameters: int) -> None:
    med, first_loss, cfg = result["medians"], result["first_step_loss"], result["config"]
    (B, L), heads = cfg["batch_shape"], args.hidden // HEAD_DIM
    print(
        f"\nlearner_overhead  model hidden={args.hidden} layers={args.layers} heads={heads} "
        f"({parameters / 1e6:.1f}M params) | batch {B} x {L} tokens "
        f"({cfg['response_tokens']} response tokens) | {args.reps} reps (+{args.warmup} warmup), medians"
    )
    print_table(
        ["side", "seconds/step", "cpu s/step", "tokens/s", "ours/side tokens/s"],
        [
            [
                s,
                med[s]["seconds"],
                med[s]["cpu_seconds"],
                med[s]["tokens_per_s"],
                med["ours"]["tokens_per_s"] / med[s]["tokens_per_s"],
            ]
            for s in SIDES
        ],
        ["{}", "{:.3f}", "{:.3f}", "{:.1f}", "{:.3f}"],
    )
    print(
        f"overhead of ours vs minimal hand loop: {result['overhead_vs_hand']:+.1%} per step (target <= {TARGET:.0%}); "
        f"vs hand loop with a separate pi_prox forward: {result['overhead_vs_hand_prox']:+.1%}"
    )
    print(
        "same comparison in process CPU time (less sensitive to other jobs on the machine): "
        f"{result['cpu_time_overhead_vs_hand']:+.1%}"
    )
    print(
        f"first-step losses agree: max |diff| = {result['first_step_loss_max_abs_diff']:.2e} "
        f"({', '.join(f'{s} {first_loss[s]:.6f}' for s in SIDES)})"
    )


if __name__ == "__main__":
    sys.exit(main())
