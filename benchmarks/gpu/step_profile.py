"""Where one learner step's time goes: `torch.profiler` over one step of ours and of the plain loop
(`benchmarks.gpu.sides`, the learner check's, same batch, after warm-up steps), each side alone on the device.

Prints per side: wall seconds, device-busy seconds (the sum of kernel times), kernel launches,
host-to-device syncs counted by the profiler's `cudaStreamSynchronize`/`cudaMemcpy` calls, and the
top kernels and top host ops by self time. Writes the tables as JSON with `--out`.

    python3 -m benchmarks.gpu.step_profile [--shape qwen2.5-0.5b] [--top 25]

On the CPU it runs at the tiny shape (what `tests/integration/test_gpu_check.py` can collect).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.gpu.models import SHAPES, batch_of, build_model, join_one_rank_group
from benchmarks.gpu.sides import Ours, Plain

SYNC_LIKE = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaMemcpyAsync",
    "cudaMemcpy",
    "aten::item",
    "aten::_local_scalar_dense",
    "aten::copy_",
)


def profile_side(name: str, build, batch, warmup: int, top: int) -> dict:
    """One side built, `warmup` steps, one step under `torch.profiler`; the side freed; the figures."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    side = build()
    try:
        for _ in range(warmup):
            side.step(batch)
        if cuda:
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            side.step(batch)
            if cuda:
                torch.cuda.synchronize()
        wall = time.perf_counter() - start
    finally:
        del side
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    out = {"side": name, "wall_s": wall, **figures(prof.key_averages(), top)}
    print(
        f"\n== {name}: wall {wall:.3f} s, device busy {out['device_busy_s']:.3f} s "
        f"({out['device_busy_s'] / wall:.0%}), {out['kernel_launches']} kernel launches"
    )
    print(f"   sync-like calls: {out['sync_like_calls']}")
    print("   top kernels (ms, calls):")
    for k in out["top_kernels"]:
        print(f"     {k['ms']:8.2f} {k['calls']:5d}  {k['name']}")
    print("   top host ops by self time (self ms, calls, device ms):")
    for k in out["top_host_ops"]:
        print(f"     {k['self_ms']:8.2f} {k['calls']:5d} {k['device_ms']:8.2f}  {k['name']}")
    return out


def figures(averages, top: int) -> dict:
    """From the profiler's averages: device-busy seconds, kernel launches, sync-like calls, and the
    top kernels and host ops by self time."""
    kernels = [a for a in averages if getattr(a, "self_device_time_total", 0) > 0 and a.device_type.name == "CUDA"]
    kernels.sort(key=lambda a: a.self_device_time_total, reverse=True)
    host = sorted(
        (a for a in averages if a.device_type.name == "CPU"), key=lambda a: a.self_cpu_time_total, reverse=True
    )
    return {
        "device_busy_s": sum(a.self_device_time_total for a in kernels) / 1e6,
        "kernel_launches": sum(a.count for a in kernels),
        "sync_like_calls": {a.key: a.count for a in averages if a.key in SYNC_LIKE},
        "top_kernels": [
            {"name": a.key[:110], "calls": a.count, "ms": a.self_device_time_total / 1e3} for a in kernels[:top]
        ],
        "top_host_ops": [
            {
                "name": a.key[:80],
                "calls": a.count,
                "self_ms": a.self_cpu_time_total / 1e3,
                "device_ms": getattr(a, "device_time_total", 0) / 1e3,
            }
            for a in host[:top]
        ],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b" if cuda else "tiny")
    p.add_argument("--batch", type=int, default=16 if cuda else 2)
    p.add_argument("--prompt", type=int, default=256 if cuda else 8)
    p.add_argument("--response", type=int, nargs=2, default=[64, 768] if cuda else [4, 16])
    p.add_argument("--warmup", type=int, default=2 if cuda else 1)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--sides", nargs="*", default=["ours", "plain"], choices=["ours", "plain"])
    p.add_argument("--cache-dir", default="~/.cache/rlhf_cluster/models")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    precision = "bf16" if cuda else "none"
    join_one_rank_group()
    model_dir = build_model(args.shape, args.cache_dir)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    batch = batch_of(args.batch, args.prompt, args.response, vocab)
    builds = {"ours": lambda: Ours(model_dir, precision), "plain": lambda: Plain(model_dir, precision)}
    result = {
        "shape": args.shape,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "sides": [profile_side(s, builds[s], batch, args.warmup, args.top) for s in args.sides],
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
