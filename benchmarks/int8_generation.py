"""INT8 rollouts: generation tokens/s of W8A8 int8 vs bf16 vs fp32 engines, and bytes per weight sync.

Three vLLM engines of the same random model (~150M parameters) live in one process: fp32, bf16,
and int8 (our W8A8 variant: per-channel int8 weights, per-token int8 activations, bf16 elsewhere).
Each repetition runs the same prompts on all three in a rotated order (fp32-bf16-int8,
bf16-int8-fp32, ...) so machine drift hits all alike; medians are reported. `ignore_eos` makes
every side generate exactly the same number of tokens.

Per variant it also measures one weight sync as the pipeline does it: the weight store publishes
the version (deriving the bf16 and int8 variants once), then the engine loads its variant from
the store and reloads in place. And it reports how far each engine's log-probs are from the fp32
engine's on the fp32 engine's own samples (k3 and mean |dlogp|): the mismatch importance
correction has to absorb.

    .venv/bin/python -m benchmarks.int8_generation [--hidden 1024 --layers 12 --prompts 32 ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks._timing import medians, time_token_rounds
from benchmarks.common import (
    headline,
    machine_info,
    model_parser,
    parse_model_args,
    print_table,
    random_model,
    raw_generate,
    write_result,
)
from rlhf_cluster.config import GenerationConfig, SamplingConfig
from rlhf_cluster.data.tasks import arithmetic_rows
from rlhf_cluster.generation.engine import VLLMEngine
from rlhf_cluster.generation.probe import mismatch
from rlhf_cluster.models.modeling import load_causal_lm
from rlhf_cluster.models.quantization import quantize_state_dict, write_int8_model_dir
from rlhf_cluster.weights import WeightStore

SIDES = ("fp32", "bf16", "int8")
TARGET = 1.25  # int8 tokens/s over bf16 tokens/s on CPU


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # 1024 x 12 with a 3072 MLP: ~150M parameters.
    p = model_parser(__doc__, "int8_generation", hidden=1024, layers=12, reps=3, warmup=1, cache="random model cache")
    p.add_argument("--intermediate", type=int, default=3072, help="MLP width")
    p.add_argument("--prompts", type=int, default=32, help="prompts per generate call (one response each)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per response (EOS ignored)")
    return parse_model_args(p, argv)


VARIANT_OF = {"fp32": None, "bf16": "bf16", "int8": "int8"}  # each engine's variant in the store


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape, model_dir = random_model(args.hidden, args.layers, args.intermediate, args.cache_dir)
    model = load_causal_lm(model_dir)
    params = sum(p.numel() for p in model.parameters())
    state = model.state_dict()
    del model

    work = Path(tempfile.mkdtemp(prefix="int8-bench-"))
    # The store derives each engine's variant once per version, as the learner's publisher does.
    variants = {
        "bf16": lambda s: {k: v.to(torch.bfloat16) for k, v in s.items()},
        "int8": lambda s: quantize_state_dict(s, torch.bfloat16),
    }
    store = WeightStore(work / "store", keep=2, variants=variants)
    store.publish(0, state)
    int8_dir = write_int8_model_dir(model_dir, store.load(0, variant="int8"), work / "engine-int8")

    gen_cfg = GenerationConfig(sampling=SamplingConfig(n=1, max_new_tokens=args.max_new_tokens), max_model_len=256)
    start = time.perf_counter()
    engines = {
        "fp32": VLLMEngine(str(model_dir), gen_cfg, dtype="float32", name="fp32"),
        "bf16": VLLMEngine(str(model_dir), gen_cfg, dtype="bfloat16", name="bf16"),
        "int8": VLLMEngine(str(int8_dir), gen_cfg, dtype="bfloat16", name="int8"),
    }
    startup_s = time.perf_counter() - start

    from vllm import SamplingParams

    texts = [r["prompt"] for r in arithmetic_rows(args.prompts, seed=0, split="bench")]
    sampling = SamplingParams(n=1, temperature=1.0, max_tokens=args.max_new_tokens, ignore_eos=True, seed=0)

    def run(side: str) -> int:
        outs = raw_generate(engines[side], texts, sampling)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    timings = time_token_rounds(SIDES, run, args.reps, args.warmup, show=True)
    publish_s, sync = one_sync_each(store, engines, state)
    drift = mismatch_vs_fp32(engines, texts)
    med = medians(timings, ("seconds", "tokens", "tokens_per_s"))
    ratio_bf16 = med["int8"]["tokens_per_s"] / med["bf16"]["tokens_per_s"]
    ratio_fp32 = med["int8"]["tokens_per_s"] / med["fp32"]["tokens_per_s"]
    paired = [i["tokens_per_s"] / b["tokens_per_s"] for i, b in zip(timings["int8"], timings["bf16"])]
    machine = machine_info()
    result = {
        "benchmark": "int8_generation",
        "machine": machine,
        "cpu_kind": machine["cpu_kind"],
        "int8_engine_dtype": engines["int8"].dtype,
        "config": {
            **{k: v for k, v in vars(args).items() if k != "out"},
            "model": shape.model_dump(),
            "parameters": params,
            "startup_seconds_all_engines": startup_s,
        },
        "timings": timings,
        "medians": med,
        "ratio_int8_over_bf16_tokens_per_s": ratio_bf16,
        "ratio_int8_over_fp32_tokens_per_s": ratio_fp32,
        "paired_ratios_int8_over_bf16": paired,
        "sync": sync,
        "publish_seconds_with_variants": publish_s,
        "variant_derive_seconds": dict(store.last_variant_seconds),
        "mismatch_vs_fp32_engine": drift,
        "headline": headline(
            "int8/bf16 generation tokens/s", ratio_bf16, f">= {TARGET}x on CPU", ratio_bf16 >= TARGET, "x"
        ),
    }
    print_report(args, result)
    write_result(args.out, result)
    return 0


def one_sync_each(store, engines: dict, state: dict) -> tuple[float, dict[str, dict]]:
    """One sync per side: version 1 published (variants derived once), then each engine's variant
    loaded from the store and reloaded in place. The publish's seconds; per side, bytes and seconds."""
    torch.manual_seed(1)
    new_state = {k: v + 1e-3 * torch.randn_like(v) for k, v in state.items()}
    begun = time.perf_counter()
    store.publish(1, new_state)
    publish_s = time.perf_counter() - begun
    sync: dict[str, dict] = {}
    for side in SIDES:
        begun = time.perf_counter()
        weights = store.load(1, variant=VARIANT_OF[side])
        loaded = time.perf_counter()
        engines[side].load_weights(1, weights.items())
        done = time.perf_counter()
        sync[side] = {
            "bytes": store.manifest(1, VARIANT_OF[side])["total_bytes"],
            "load_seconds": loaded - begun,
            "reload_seconds": done - loaded,
            "seconds": done - begun,
        }
    return publish_s, sync


def mismatch_vs_fp32(engines: dict, texts: list[str]) -> dict[str, dict]:
    """Each other engine's log-probs against the fp32 engine's, on the fp32 engine's own samples of the
    new version: the mismatch (k3, ...) and the mean |dlogp|."""
    from vllm import SamplingParams

    outs = raw_generate(engines["fp32"], texts, SamplingParams(n=1, temperature=1.0, max_tokens=32, seed=1))
    prompt_ids = [list(o.prompt_token_ids) for o in outs]
    response_ids = [list(o.outputs[0].token_ids) for o in outs]
    reference = engines["fp32"].logprobs_of_many(prompt_ids, response_ids)
    drift = {}
    for side in ("bf16", "int8"):
        other = engines[side].logprobs_of_many(prompt_ids, response_ids)
        m = mismatch(reference, other)
        deltas = [abs(a - b) for ra, rb in zip(reference, other) for a, b in zip(ra, rb)]
        drift[side] = {**asdict(m), "mean_abs_diff": statistics.fmean(deltas)}
    return drift


def print_report(args: argparse.Namespace, result: dict) -> None:
    machine, med, sync, drift = result["machine"], result["medians"], result["sync"], result["mismatch_vs_fp32_engine"]
    print(
        f"\nint8_generation  {result['config']['parameters'] / 1e6:.0f}M parameters | {args.prompts} prompts x "
        f"{args.max_new_tokens} tokens | {args.reps} reps (+{args.warmup} warmup), medians | CPU kind "
        f"{machine['cpu_kind']} ({machine['cpu_model']})"
    )
    print_table(
        ["engine", "tokens/s", "vs bf16", "sync MB", "sync s", "k3 vs fp32", "mean|dlogp|"],
        [
            [
                side,
                med[side]["tokens_per_s"],
                med[side]["tokens_per_s"] / med["bf16"]["tokens_per_s"],
                sync[side]["bytes"] / 1e6,
                sync[side]["seconds"],
                drift.get(side, {}).get("k3"),
                drift.get(side, {}).get("mean_abs_diff"),
            ]
            for side in SIDES
        ],
        ["{}", "{:.1f}", "{:.2f}x", "{:.1f}", "{:.3f}", "{:.2e}", "{:.4f}"],
    )
    ratio_bf16, ratio_fp32 = result["ratio_int8_over_bf16_tokens_per_s"], result["ratio_int8_over_fp32_tokens_per_s"]
    print(f"int8 / bf16 tokens/s: {ratio_bf16:.2f}x (target >= {TARGET}x); int8 / fp32: {ratio_fp32:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
