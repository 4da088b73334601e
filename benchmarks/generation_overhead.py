"""Generation overhead: `VLLMEngine.generate` (ours) vs vLLM's own generate loop on the engine it wraps.

Both sides use the SAME engine instance (same weights, same KV cache, same sampling settings):
"raw" is `raw_generate(engine, texts, SamplingParams(..., logprobs=0))` (vLLM's add-requests,
step-until-done loop, as `LLM.generate` runs it), "ours" is
`engine.generate(prompts)`, which makes the same call and then builds one `Rollout` (ids, per-token
log-probs, version, finish reason) per response. The calls alternate, and the order flips every
repetition (raw-ours, ours-raw, ...) so drift of the machine (thermal, caches, other processes)
hits both sides alike. Medians are reported; every single timing goes to the JSON file.

Sampling is random (temperature 1.0), so the two sides do not produce the same number of tokens;
throughput is counted from the tokens actually generated (sum of len(token_ids)).

    .venv/bin/python -m benchmarks.generation_overhead [--hidden 256 --layers 4 --prompts 32 ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from benchmarks._timing import medians, time_token_rounds
from benchmarks.common import (
    HEAD_DIM,
    headline,
    machine_info,
    model_parser,
    parse_model_args,
    qwen2_shape,
    raw_generate,
    write_result,
)
from rlhf_cluster.config import GenerationConfig, SamplingConfig
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.data.tasks import arithmetic_rows
from rlhf_cluster.generation.engine import VLLMEngine
from rlhf_cluster.models.tiny_model import ensure_tiny_model

TARGET = 0.95  # record building may cost at most 5% of raw throughput


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = model_parser(__doc__, "generation_overhead", hidden=256, layers=4, reps=5, warmup=1)
    p.add_argument("--prompts", type=int, default=32, help="prompts per generate call")
    p.add_argument("--n", type=int, default=4, help="responses per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="per-response token limit")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return parse_model_args(p, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kv_heads = max(1, args.hidden // HEAD_DIM // 2)
    tiny = qwen2_shape(args.hidden, args.layers, kv_heads, positions=max(256, args.max_new_tokens + 32))
    sampling = SamplingConfig(n=args.n, temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens)
    gen_cfg = GenerationConfig(sampling=sampling, max_model_len=tiny.max_position_embeddings)
    rows = arithmetic_rows(args.prompts, seed=0, split="bench")
    prompts = [Prompt(r["prompt_id"], r["prompt"], r["answer"]) for r in rows]

    t0 = time.perf_counter()
    model_dir = ensure_tiny_model(tiny, args.cache_dir)
    engine = VLLMEngine(str(model_dir), gen_cfg, dtype=args.dtype, seed=0, name="bench")
    startup_s = time.perf_counter() - t0

    from vllm import SamplingParams

    texts = [p.text for p in prompts]

    def run_raw() -> int:
        params = SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            logprobs=0,
            seed=None,
        )
        outs = raw_generate(engine, texts, params)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    def run_ours() -> int:
        rollouts, _ = engine.generate(prompts)
        return sum(len(r.response_ids) for r in rollouts)

    sides = {"raw": run_raw, "ours": run_ours}
    timings = time_token_rounds(tuple(sides), lambda side: sides[side](), args.reps, args.warmup)
    med = medians(timings, ("seconds", "tokens", "tokens_per_s"))
    paired = [o["tokens_per_s"] / r["tokens_per_s"] for r, o in zip(timings["raw"], timings["ours"])]
    ratio = med["ours"]["tokens_per_s"] / med["raw"]["tokens_per_s"]
    result = {
        "benchmark": "generation_overhead",
        "machine": machine_info(),
        "config": {
            **{k: v for k, v in vars(args).items() if k != "out"},
            "tiny_model": tiny.model_dump(),
            "sampling": sampling.model_dump(),
            "model_dir": str(model_dir),
            "startup_seconds": startup_s,
        },
        "timings": timings,
        "medians": med,
        "ratio_ours_over_raw_tokens_per_s": ratio,
        "paired_ratios_ours_over_raw": paired,
        "median_paired_ratio": statistics.median(paired),
        "headline": headline("ours/raw tokens/s", ratio, f">= {TARGET} (1.0 = no overhead)", ratio >= TARGET, "x"),
    }

    print_report(args, result)
    write_result(args.out, result)
    return 0


def print_report(args: argparse.Namespace, result: dict) -> None:
    med, ratio, paired = result["medians"], result["ratio_ours_over_raw_tokens_per_s"], result["median_paired_ratio"]
    print(
        f"\ngeneration_overhead  model hidden={args.hidden} layers={args.layers} heads={args.hidden // HEAD_DIM} | "
        f"{args.prompts} prompts x n={args.n} x <= {args.max_new_tokens} tokens | {args.reps} reps "
        f"(+{args.warmup} warmup), medians"
    )
    print(f"{'side':<6} {'seconds':>9} {'tokens':>8} {'tokens/s':>10}")
    for side in ("raw", "ours"):
        m = med[side]
        print(f"{side:<6} {m['seconds']:>9.3f} {m['tokens']:>8.0f} {m['tokens_per_s']:>10.1f}")
    print(f"ratio ours/raw tokens/s: {ratio:.3f}  (median of paired ratios {paired:.3f}; 1.0 = no overhead)")


if __name__ == "__main__":
    sys.exit(main())
