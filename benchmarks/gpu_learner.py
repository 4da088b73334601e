"""Learner throughput on a GPU: `FSDP2Learner.train_step` tokens/s and model FLOPs utilisation,
with gradient checkpointing off vs on, side by side, plus peak GPU memory of each.

On CUDA (the point of this benchmark) the defaults are a random ~0.5B Qwen2 (hidden 1280, 24
layers, MLP 5120) in bf16 mixed precision (`learner.mixed_precision: bf16`: bf16 compute, fp32
master weights), SDPA or flash-attn (`load_causal_lm` picks flash-attn when installed), one rank.
Without CUDA it runs the same code on a small model as a smoke run: tokens/s only (no MFU, no
memory figures), so `make bench` exercises it everywhere.

MFU = 6 x parameters x tokens / step time / the GPU's dense bf16 peak (per-token FLOPs of a
forward and backward, ignoring attention; with checkpointing the recomputed forward is not
counted, so its MFU is "useful" FLOPs). The two settings run alternately, `--reps` timed steps
each after `--warmup`, medians reported.

    .venv/bin/python benchmarks/gpu_learner.py [--hidden 1280 --layers 24 --batch 16 --seq 512 ...]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from _common import free_port, headline, machine_info, print_table, random_model, result_path, write_result
from rlhf_cluster.config import JobConfig
from rlhf_cluster.learner.fsdp2 import FSDP2Learner
from rlhf_cluster.records import ScoredSample, TrainBatch

# Dense bf16 peak FLOP/s by device name (vendor datasheets; sparse figures halved).
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}
SIDES = ("no_checkpointing", "checkpointing")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1280 if cuda else 256)
    p.add_argument("--layers", type=int, default=24 if cuda else 2)
    p.add_argument("--intermediate", type=int, default=5120 if cuda else 1024)
    p.add_argument("--batch", type=int, default=16 if cuda else 4, help="sequences per step")
    p.add_argument("--seq", type=int, default=512 if cuda else 128, help="tokens per sequence (prompt 1/4, response 3/4)")
    p.add_argument("--reps", type=int, default=5 if cuda else 2)
    p.add_argument("--warmup", type=int, default=2 if cuda else 1)
    p.add_argument("--precision", default="bf16" if cuda else "none", choices=["bf16", "none"])
    p.add_argument("--cache-dir", default="~/.cache/rlhf_cluster/models")
    p.add_argument("--out", type=Path, default=result_path("gpu_learner"))
    return p.parse_args(argv)


def make_batch(batch: int, seq: int, vocab: int) -> TrainBatch:
    rng = random.Random(0)
    prompt, response = seq // 4, seq - seq // 4
    samples = [ScoredSample(
        sample_id=f"s{i}", prompt_id=f"p{i}", group_id=f"g{i}",
        prompt_ids=[rng.randrange(2, vocab) for _ in range(prompt)],
        response_ids=[rng.randrange(2, vocab) for _ in range(response)],
        rollout_logprobs=[-6.0] * response, policy_version=0, finish_reason="length", reward=0.0,
        reward_components={}, ref_logprobs=[-6.0] * response, advantages=[rng.uniform(-1, 1)] * response,
    ) for i in range(batch)]
    return TrainBatch.from_samples(samples)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    shape, model_dir = random_model(args.hidden, args.layers, args.intermediate, args.cache_dir)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    batch = make_batch(args.batch, args.seq, vocab)
    tokens = int(batch.attention_mask.sum())

    learners, peaks = {}, {}
    for side in SIDES:
        cfg = JobConfig.model_validate({
            "learner": {"lr": 1e-5, "mixed_precision": args.precision, "gradient_checkpointing": side == "checkpointing"},
            "generation": {"sampling": {"max_new_tokens": args.seq}},
            "algorithm": {"kl": {"placement": "loss", "coef": 0.01}},
            "metrics": {"enabled": False},
        })
        learners[side] = FSDP2Learner(cfg, str(model_dir))
    params = sum(p.numel() for p in learners[SIDES[0]].model.parameters())

    timings: dict[str, list[float]] = {side: [] for side in SIDES}
    for rep in range(-args.warmup, args.reps):
        for side in (SIDES if rep % 2 == 0 else SIDES[::-1]):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            learners[side].train_step(batch, kl_coef=0.01)
            if cuda:
                torch.cuda.synchronize()
                peaks[side] = max(peaks.get(side, 0), torch.cuda.max_memory_allocated())
            if rep >= 0:
                timings[side].append(time.perf_counter() - start)

    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = next((flops for name, flops in BF16_PEAK.items() if name in device), None) if cuda else None
    med = {side: statistics.median(ts) for side, ts in timings.items()}
    figures = {}
    for side in SIDES:
        tps = tokens / med[side]
        figures[side] = {"seconds_per_step": med[side], "tokens_per_s": tps,
                         "mfu": 6 * params * tps / peak if peak else None,
                         "peak_memory_gib": peaks[side] / 2**30 if side in peaks else None}
    main_side = figures["no_checkpointing"]
    result = {
        "benchmark": "gpu_learner",
        "machine": machine_info(),
        "config": {**{k: v for k, v in vars(args).items() if k != "out"}, "model": shape.model_dump(), "parameters": params,
                   "tokens_per_step": tokens, "device": device, "bf16_peak_flops": peak},
        "timings": timings,
        "figures": figures,
        "headline": headline("learner MFU (bf16, no checkpointing)" if peak else "learner tokens/s (no MFU without a known GPU)",
                             main_side["mfu"] if peak else main_side["tokens_per_s"], "report", None, "" if peak else "tokens/s"),
    }
    print(f"\ngpu_learner  {device} | {params / 1e6:.0f}M params | {args.batch} x {args.seq} tokens | "
          f"precision {args.precision} | {args.reps} reps (+{args.warmup} warmup), medians")
    print_table(["setting", "s/step", "tokens/s", "MFU", "peak GiB"],
                [[side, f["seconds_per_step"], f["tokens_per_s"], f["mfu"], f["peak_memory_gib"]] for side, f in figures.items()],
                ["{}", "{:.3f}", "{:.0f}", "{:.1%}", "{:.2f}"])
    write_result(args.out, result)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
