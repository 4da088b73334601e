"""Frozen scoring on int8 weights: reference log-probs and reward-model scores, int8 vs fp32 vs bf16.

The scoring pool's two frozen models, built from one random Qwen2 (default ~150M parameters, as
in int8_generation): `ReferenceModel` (per-token log-probs of responses) and `FrozenRewardModels`
(a reward model: the same backbone plus a scalar head, saved and loaded as `train-rm` writes it).
Each runs in three variants, `scoring.quantization: none` at fp32 and at bf16, and `int8`
(`Int8Linear`: per-channel int8 weights, per-token int8 activations, on vLLM's AMX kernel where
vLLM picks it on this CPU, else torch._int_mm; where AMX runs, `int8_int_mm` beside it). Every
repetition scores the same rollouts with all of them in a rotated order; medians are reported as
scored tokens/s, with the error of each variant against fp32 (max |dlogp|, max |dscore|).

    .venv/bin/python -m benchmarks.int8_scoring [--hidden 1024 --layers 12 --rollouts 32 ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._timing import rotated
from benchmarks.common import headline, machine_info, print_table, random_model, result_path, write_result
from rlhf_cluster.config import RewardModelSpec
from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.models.quantization import Int8Linear, quantize_linears
from rlhf_cluster.models.scalar_head import RewardModel
from rlhf_cluster.scoring.reference import ReferenceModel
from rlhf_cluster.scoring.reward_model import FrozenRewardModels

VARIANTS = {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none"), "int8": ("float32", "int8")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=3072)
    p.add_argument("--rollouts", type=int, default=16, help="sequences scored per call")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--response-len", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--cache-dir", default="~/.cache/rlhf_cluster/models")
    p.add_argument("--out", type=Path, default=result_path("int8_scoring"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.hidden % 64:
        raise SystemExit("--hidden must be a multiple of 64")
    shape, model_dir = random_model(args.hidden, args.layers, args.intermediate, args.cache_dir)
    rollouts = make_rollouts(args, model_dir)
    tokens = sum(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
    refs, rms = scorers(model_dir)
    kernels = sorted({m.kernel for m in refs["int8"].model.modules() if isinstance(m, Int8Linear)})
    names = list(refs)
    sides = [f"{kind}/{name}" for kind in ("reference", "reward") for name in names]
    outputs: dict[str, object] = {}

    def run(side: str):
        kind, name = side.split("/")
        return refs[name].logprobs(rollouts) if kind == "reference" else rms[name].score(rollouts)["rm"]

    timings: dict[str, list[float]] = {side: [] for side in sides}
    for rep in range(-args.warmup, args.reps):
        for side in rotated(sides, rep):
            start = time.perf_counter()
            outputs[side] = run(side)
            seconds = time.perf_counter() - start
            if rep >= 0:
                timings[side].append(seconds)
        if rep >= 0:
            print(f"rep {rep}: " + ", ".join(f"{s} {timings[s][-1]:.2f}s" for s in sides), flush=True)

    med = {side: statistics.median(ts) for side, ts in timings.items()}
    errors = errors_vs_fp32(outputs, names)
    ratio = {kind: med[f"{kind}/fp32"] / med[f"{kind}/int8"] for kind in ("reference", "reward")}
    machine = machine_info()
    result = {
        "benchmark": "int8_scoring",
        "machine": machine,
        "cpu_kind": machine["cpu_kind"],
        "int8_kernels": kernels,
        "config": {
            **{k: v for k, v in vars(args).items() if k != "out"},
            "model": shape.model_dump(),
            "tokens_per_call": tokens,
        },
        "timings": timings,
        "median_seconds": med,
        "tokens_per_s": {side: tokens / s for side, s in med.items()},
        "errors_vs_fp32": errors,
        "ratio_int8_over_fp32_tokens_per_s": ratio,
        "headline": headline(
            "int8/fp32 reference scoring tokens/s", ratio["reference"], "report (no target)", None, "x"
        ),
    }
    print_report(args, result, sides)
    write_result(args.out, result)
    return 0


def make_rollouts(args: argparse.Namespace, model_dir) -> list[Rollout]:
    """`--rollouts` sequences of random tokens: `--prompt-len` prompt and `--response-len` response tokens."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    g = torch.Generator().manual_seed(0)
    rollouts = []
    for i in range(args.rollouts):
        prompt = torch.randint(2, vocab, (args.prompt_len,), generator=g).tolist()
        response = torch.randint(2, vocab, (args.response_len,), generator=g).tolist()
        rollouts.append(Rollout(f"s{i}", f"p{i}", f"g{i}", prompt, response, [0.0] * len(response), 0, "length"))
    return rollouts


def scorers(model_dir) -> tuple[dict, dict]:
    """The reference models and the reward models (the same backbone plus a scalar head), by variant;
    where Int8Linear runs vLLM's AMX kernel, an `int8_int_mm` variant beside them on torch._int_mm."""
    work = Path(tempfile.mkdtemp(prefix="int8-scoring-"))
    rm_dir = RewardModel.from_lm(model_dir, seed=0).save_pretrained(work / "rm")
    spec = [RewardModelSpec(path=str(rm_dir))]
    refs = {
        name: ReferenceModel(str(model_dir), getattr(torch, dtype), quantization=q)
        for name, (dtype, q) in VARIANTS.items()
    }
    rms = {
        name: FrozenRewardModels(spec, getattr(torch, dtype), quantization=q) for name, (dtype, q) in VARIANTS.items()
    }
    # Which kernel Int8Linear runs: vLLM's AMX one where vLLM picks it on this CPU, else torch._int_mm.
    kernels = sorted({m.kernel for m in refs["int8"].model.modules() if isinstance(m, Int8Linear)})
    if kernels == ["amx"]:  # where the AMX kernel runs, torch._int_mm beside it (what ran here before issue 53)
        refs["int8_int_mm"] = ReferenceModel(str(model_dir), torch.float32)
        rms["int8_int_mm"] = FrozenRewardModels(spec, torch.float32)
        for model in (refs["int8_int_mm"].model, *rms["int8_int_mm"].models.values()):
            quantize_linears(model, kernel="int_mm")
    return refs, rms


def errors_vs_fp32(outputs: dict, names: list[str]) -> dict[str, dict]:
    """Per variant after fp32: the largest |log-prob| and |score| difference from fp32's."""
    errors = {}
    for name in names[1:]:
        ref_err = max(
            abs(a - b) for x, y in zip(outputs["reference/fp32"], outputs[f"reference/{name}"]) for a, b in zip(x, y)
        )
        rm_err = max(abs(a - b) for a, b in zip(outputs["reward/fp32"], outputs[f"reward/{name}"]))
        errors[name] = {"reference_max_abs_logprob_diff": ref_err, "reward_max_abs_score_diff": rm_err}
    return errors


def print_report(args: argparse.Namespace, result: dict, sides: list[str]) -> None:
    machine, med, errors = result["machine"], result["median_seconds"], result["errors_vs_fp32"]
    tokens = result["config"]["tokens_per_call"]
    print(
        f"\nint8_scoring  {args.rollouts} sequences x {args.prompt_len}+{args.response_len} tokens | "
        f"{args.reps} reps (+{args.warmup} warmup), medians | CPU kind {machine['cpu_kind']} "
        f"({machine['cpu_model']}), int8 kernel {'+'.join(result['int8_kernels'])}"
    )

    def error(side: str) -> float | None:
        kind, name = side.split("/")
        if name == "fp32":
            return None
        return errors[name]["reference_max_abs_logprob_diff" if kind == "reference" else "reward_max_abs_score_diff"]

    print_table(
        ["model/variant", "tokens/s", "vs fp32", "max |error| vs fp32"],
        [[side, tokens / med[side], med[side.split("/")[0] + "/fp32"] / med[side], error(side)] for side in sides],
        ["{}", "{:.0f}", "{:.2f}x", "{:.4f}"],
    )


if __name__ == "__main__":
    sys.exit(main())
