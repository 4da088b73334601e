"""The two GPU paths beside the learner step, at a real shape: the scoring pool's reference forward
and the weight path's host hop.

- Reference forward: `ReferenceModel` (bf16, and `scoring.quantization: int8`) with its default token
  budget (`scoring.max_tokens_per_batch: auto`: sized by the free memory on a GPU, recorded as
  `token_budget`) scoring `--rollouts` rollouts (256-token prompts, responses of 64..768 tokens,
  seeded): tokens/s, forward MFU
  (2 x parameters x tokens / time / the GPU's dense bf16 peak), peak memory, and the int8 side's
  mean |log-prob difference| from bf16.
- Host hop: an FSDP2 learner's `named_full_tensors()` (fp32, what the store publishes) drained to
  host memory, and `named_engine_tensors(bf16)` (what engines load, left on the device) packed into
  host buckets as the `direct` transport packs them (`VersionPacker`: reused pinned staging,
  asynchronous copies, one wait per bucket), with BLAKE3 per bucket and without (the copies alone),
  GB/s, against one pinned device-to-host copy of 2 GiB (the wire's bound).
Without CUDA the same code runs at the `tiny` shape on the CPU (a smoke run: figures not comparable).

    python3 -m benchmarks.gpu.paths --shape qwen2.5-0.5b
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from pathlib import Path
from unittest.mock import patch

import torch
import torch.distributed as dist

from benchmarks.common import headline, machine_info, print_table, result_path, write_result
from benchmarks.gpu.models import SHAPES, build_model, device_and_peak, join_one_rank_group, parameter_counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b" if cuda else "tiny")
    p.add_argument("--rollouts", type=int, default=64 if cuda else 4)
    p.add_argument("--prompt", type=int, default=256 if cuda else 16)
    p.add_argument("--response", type=int, nargs=2, default=[64, 768] if cuda else [8, 32])
    p.add_argument("--reps", type=int, default=3 if cuda else 1)
    p.add_argument("--parts", nargs="+", choices=["reference", "host_hop"], default=["reference", "host_hop"])
    p.add_argument("--cache-dir", default="~/.cache/rlhf_cluster/models")
    p.add_argument("--out", type=Path, default=result_path("gpu_paths"))
    return p.parse_args(argv)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reference_forward(args, model_dir: Path, shape, vocab: int, peak_flops: float | None) -> dict[str, dict]:
    """`ReferenceModel` at bf16 (fp32 on the CPU) and int8 scoring the same rollouts: per variant its
    median seconds, tokens/s, MFU both ways (a forward: 2·N per token, and with attention;
    `rlhf_cluster.models.flops`), peak memory, token budget, and its log-probs' distance from the first's."""
    from rlhf_cluster.models.flops import batch_flops, utilization
    from rlhf_cluster.scoring.reference import ReferenceModel

    rollouts = _rollouts(args, vocab)
    lengths = [len(r.prompt_ids) + len(r.response_ids) for r in rollouts]
    tokens, flops = sum(lengths), batch_flops(shape, lengths, backward=False)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    out: dict[str, dict] = {}
    first = None
    for quantization in ("none", "int8"):
        name = "int8" if quantization == "int8" else "bf16" if dtype == torch.bfloat16 else "fp32"
        model = ReferenceModel(str(model_dir), dtype, quantization=quantization)
        s, logprobs = _time_logprobs(model, rollouts, args.reps)
        mfu = utilization(flops, s, peak_flops) if peak_flops else None
        row = {
            "seconds": s,
            "tokens": tokens,
            "tokens_per_s": tokens / s,
            "mfu": mfu.dense if mfu else None,
            "mfu_with_attention": mfu.with_attention if mfu else None,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "token_budget": model.max_tokens_per_batch,
        }  # scoring.max_tokens_per_batch: auto, as resolved
        flat = torch.tensor([x for r in logprobs for x in r])
        if first is None:
            first = flat
        else:
            row["mean_abs_logprob_diff_vs_first"] = float((flat - first).abs().mean())
        out[f"reference/{name}"] = row
        print(f"  reference {name}: {tokens / s:.0f} tokens/s (token budget {model.max_tokens_per_batch})", flush=True)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def _rollouts(args: argparse.Namespace, vocab: int) -> list:
    """`--rollouts` rollouts of random tokens: `--prompt`-token prompts, responses in the `--response` range."""
    from rlhf_cluster.experience.records import Rollout

    rng = random.Random(0)
    rollouts = []
    for i in range(args.rollouts):
        r = rng.randint(*args.response)
        prompt = [rng.randrange(2, vocab) for _ in range(args.prompt)]
        response = [rng.randrange(2, vocab) for _ in range(r)]
        rollouts.append(Rollout(f"s{i}", f"p{i}", "g", prompt, response, [-6.0] * r, 0, "stop"))
    return rollouts


def _time_logprobs(model, rollouts: list, reps: int) -> tuple[float, list]:
    """The median seconds of `reps` calls scoring `rollouts` (after a warm-up; peak memory counted from
    it), and the last call's log-probs."""
    model.logprobs(rollouts[:2])  # warm-up
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        logprobs = model.logprobs(rollouts)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), logprobs


def host_hop(model_dir: Path) -> dict[str, dict]:
    """An FSDP2 learner's weights to host memory, three ways (see the module's docstring), and on CUDA
    one pinned device-to-host copy of 2 GiB beside them: seconds, bytes and GB/s of each."""
    from rlhf_cluster.config import JobConfig
    from rlhf_cluster.learner.base import LearnerSpec
    from rlhf_cluster.learner.fsdp2 import FSDP2Learner

    cuda = torch.cuda.is_available()
    cfg = JobConfig.model_validate(
        {"learner": {"world_size": 1, "mixed_precision": "bf16" if cuda else "none"}, "metrics": {"enabled": False}}
    )
    learner = FSDP2Learner(LearnerSpec.of_policy(cfg), str(model_dir))
    out = _time_hops(learner)
    del learner
    gc.collect()
    if cuda:
        out["pinned device-to-host copy"] = _pinned_copy()
    return out


def _time_hops(learner) -> dict[str, dict]:
    from rlhf_cluster.weights import buckets
    from rlhf_cluster.weights.buckets import Staging, VersionPacker

    def drained() -> int:
        return sum(t.numel() * t.element_size() for _, t in learner.named_full_tensors())

    staging = Staging(reuse=True)

    def packed() -> int:
        packer = VersionPacker(0, "hop", "full", torch.bfloat16, 64 << 20, lambda payload: None, staging)
        return packer.pack(learner.named_engine_tensors(torch.bfloat16))[0].total_bytes

    def copies_only() -> int:
        with patch.object(buckets, "checksum", lambda payload: ""):
            return packed()

    out: dict[str, dict] = {}
    for name, run in (
        ("named_full_tensors (fp32)", drained),
        ("engine tensors (bf16) packed", packed),
        ("engine tensors (bf16) staged, no checksum", copies_only),
    ):
        run()  # warm-up: the staging buffer, the allocator
        sync()
        start = time.perf_counter()
        nbytes = run()
        s = time.perf_counter() - start
        out[name] = {"seconds": s, "bytes": nbytes, "gb_per_s": nbytes / 1e9 / s}
        print(f"  {name}: {nbytes / 1e9:.2f} GB in {s:.2f} s = {nbytes / 1e9 / s:.1f} GB/s", flush=True)
    return out


def _pinned_copy() -> dict:
    """One pinned device-to-host copy of 2 GiB (the wire's bound), after a warm-up one."""
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    host = torch.empty(x.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(x)  # warm-up
    sync()
    start = time.perf_counter()
    host.copy_(x)
    sync()
    s = time.perf_counter() - start
    row = {"seconds": s, "bytes": x.numel(), "gb_per_s": x.numel() / 1e9 / s}
    del x, host
    torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    join_one_rank_group()
    model_dir = build_model(args.shape, args.cache_dir)
    from transformers import AutoConfig

    from rlhf_cluster.models.flops import FlopsShape

    config = AutoConfig.from_pretrained(model_dir)
    params, active = parameter_counts(config)  # an MoE's MFU counts its active parameters
    device, peak_flops = device_and_peak()
    try:
        scoring = (
            reference_forward(args, model_dir, FlopsShape.of_config(config, active), config.vocab_size, peak_flops)
            if "reference" in args.parts
            else {}
        )
        hop = host_hop(model_dir) if "host_hop" in args.parts else {}
    finally:
        dist.destroy_process_group()
    config_row = {**{k: v for k, v in vars(args).items() if k != "out"}, "parameters": params, "device": device}
    if not scoring:  # the host hop alone
        packed = hop["engine tensors (bf16) packed"]["gb_per_s"]
        write_result(
            args.out,
            {
                "benchmark": "gpu_paths",
                "machine": machine_info(),
                "host_hop": hop,
                "config": config_row,
                "headline": headline(
                    "host hop, bf16 engine tensors packed", packed, ">= 25 GB/s (one H100, 1.5B)", None, " GB/s"
                ),
            },
        )
        _print_hop(hop, "{:.1f}")
        return 0
    first = next(iter(scoring.values()))
    result = {
        "benchmark": "gpu_paths",
        "machine": machine_info(),
        "config": {**config_row, "bf16_peak_flops": peak_flops},
        "reference_forward": scoring,
        "host_hop": hop,
        "headline": headline(
            "reference forward MFU" if peak_flops else "reference forward tokens/s",
            first["mfu"] if peak_flops else first["tokens_per_s"],
            "report",
            None,
            "",
        ),
    }
    print(
        f"\ngpu_paths  {device} | {args.shape}: {params / 1e6:.1f}M params | {args.rollouts} rollouts, "
        f"{first['tokens']} tokens | {args.reps} reps, medians"
    )
    print_table(
        ["reference forward", "tokens/s", "MFU", "peak GiB", "|dlogp| vs first"],
        [
            [n, r["tokens_per_s"], r["mfu"], r["peak_memory_gib"], r.get("mean_abs_logprob_diff_vs_first")]
            for n, r in scoring.items()
        ],
        ["{}", "{:.0f}", "{:.1%}", "{:.1f}", "{:.4f}"],
    )
    _print_hop(hop, "{:.2f}")
    write_result(args.out, result)
    return 0


def _print_hop(hop: dict[str, dict], gb_per_s: str) -> None:
    print_table(
        ["host hop", "GB", "seconds", "GB/s"],
        [[n, r["bytes"] / 1e9, r["seconds"], r["gb_per_s"]] for n, r in hop.items()],
        ["{}", "{:.2f}", "{:.3f}", gb_per_s],
    )


if __name__ == "__main__":
    sys.exit(main())
