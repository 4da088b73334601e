"""The learner at real model shapes: our FSDP2 step against a plain PyTorch loop on the same tokens,
and the memory of the log-prob path at a real vocabulary.

Learner step (`--shape`): random weights built from a published shape (vocabulary 151,936, tied
embeddings where the real model ties them) and RL-shaped batches (on CUDA 16 sequences, 256-token
prompts, responses of 64..768 tokens drawn with a fixed seed; a third of a padded batch is
padding). One side at a time (built, timed, freed before the next is built: no two share the
GPU's memory), `--reps` timed steps each after `--warmup`, medians:
- `ours`: `FSDP2Learner.train_step` as configured by default (sequence packing, chunked log-probs,
  one host read per update; on CUDA bf16 mixed precision and the memory plan's checkpointing and
  micro-batch tokens, `rlhf_cluster/learner/memory_plan.py`, whose estimate is printed beside the
  measured peak);
- `ours+ckpt` (`--checkpointing`): the same with gradient checkpointing forced on;
- `ours, deepspeed` (`--deepspeed`): the same step on the DeepSpeed ZeRO-3 backend;
- `ours, compiled` (`--compile`): ours with `learner.compile` (each decoder layer's forward through
  inductor; its compilation falls in the warm-up steps);
- `ours, flex_attention` (`--attention flex_attention`, any `learner.attention`): ours with that
  attention instead of the default (`auto`: SDPA here, where max_new_tokens is 1024); FlexAttention runs
  one packed row per micro-batch under a document mask;
- `plain`: the loop a user would write: fp32 master weights, bf16 autocast on CUDA, fused AdamW on
  CUDA, the model's full logits and a log-softmax over them, the padded batch.
`--seq-lens 1024 4096 16384` times ours (and `--seq-len-sides`) again on sequences of about those
lengths, `--tokens-per-step` tokens per step (MFU should not fall with length).
Figures: seconds per step, real-token MFU (6 x parameters x real tokens / step time / the GPU's
dense bf16 peak), peak GPU memory, and ours / plain. On the CPU also the aten operations of one of
ours' steps, and those per decoder layer per micro-batch in its forward (what a GPU launches).
Without CUDA the same code runs at the `tiny` shape (still vocabulary 151,936; `make gpu-check` uses
`smoke`, the same at 8,192) as a smoke run: seconds only, and the before/after ratio of the CPU
learner (`ours` vs `ours` with the padded full-logits path of before issue 35).
A mixture of experts (`--shape qwen3-moe-1.6b-a0.6b`, a random Qwen3-MoE, `models.MOE_SHAPES`;
`moe-smoke` on the CPU) is timed the same way, its MFU on active parameters (6 x active parameters
x real tokens: each token runs top_k of a layer's experts, `rlhf_cluster/models/flops.py`); the
result's config gives total and active parameters, the MoE shape and transformers' experts
implementation (`grouped_mm` where it dispatches).

Log-prob path memory (CPU, `--logprob-tokens`): forward and backward of the response tokens'
log-probs and entropies from final hidden states (hidden 896, vocabulary 151,936), the chunked
path (`rlhf_cluster.models.chunked_logprobs`) against the full-logits path it replaced, each in its own
process, peak resident memory above the inputs. The full path runs under a data limit
(`--full-limit-gib`): where it does not fit, its figure is "more than the limit".

    .venv/bin/python -m benchmarks.gpu.learner                       # CPU: tiny shape + log-prob memory at 8k tokens
    .venv/bin/python -m benchmarks.gpu.learner --shape demo --batch 128 --prompt 8 --response 1 4 --logprob-tokens
                                                                     # CPU: the demo's learner step, before vs after
    python3 -m benchmarks.gpu.learner --shape qwen2.5-1.5b [--checkpointing] [--deepspeed] [--seq-lens 4096 16384]
        [--side "fused head:logprob_head=fused"] [--memory-budget-gib 40]
                                                                     # on a GPU (make gpu-check runs the set)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.common import headline, machine_info, print_table, result_path, write_result
from benchmarks.gpu.logprob_memory import logprob_memory
from benchmarks.gpu.models import (
    MOE_SHAPES,
    SHAPES,
    batch_of,
    build_model,
    device_and_peak,
    join_one_rank_group,
    long_batch,
    parameter_counts,
)
from benchmarks.gpu.sides import Ours, Plain, op_counts, time_side


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b" if cuda else "tiny")
    p.add_argument("--batch", type=int, default=16 if cuda else 4, help="sequences per step")
    p.add_argument("--prompt", type=int, default=256 if cuda else 32, help="prompt tokens per sequence")
    p.add_argument(
        "--response",
        type=int,
        nargs=2,
        default=[64, 768] if cuda else [8, 96],
        help="response lengths drawn uniformly from this range (seeded)",
    )
    p.add_argument("--checkpointing", action="store_true", help="also time ours with gradient checkpointing")
    p.add_argument("--padded", action="store_true", help="also time ours with sequence packing off (right-padded rows)")
    p.add_argument("--deepspeed", action="store_true", help="also time ours on the DeepSpeed ZeRO-3 backend")
    p.add_argument(
        "--compile", action="store_true", help="also time ours with learner.compile (regional torch.compile)"
    )
    p.add_argument(
        "--attention",
        nargs="*",
        default=[],
        choices=["sdpa", "flex_attention", "flash_attention_2", "varlen", "eager"],
        help="also time ours with these learner.attention settings (the default is auto)",
    )
    add_side_option(p, "fused head:logprob_head=fused")
    p.add_argument(
        "--memory-budget-gib",
        type=float,
        default=None,
        help="CUDA: every side of ours plans its memory for this many GiB of the GPU (learner.memory_fraction)",
    )
    p.add_argument("--no-plain", dest="plain", action="store_false", help="leave the plain loop out")
    p.add_argument(
        "--seq-lens",
        type=int,
        nargs="*",
        default=[],
        help="also time ours (and --seq-len-sides) on sequences of about these many tokens each, "
        "--tokens-per-step tokens per step (e.g. 1024 4096 16384)",
    )
    p.add_argument("--seq-len-sides", nargs="*", default=["ours"], help="the sides timed at --seq-lens")
    p.add_argument("--tokens-per-step", type=int, default=16384, help="tokens per step at --seq-lens")
    p.add_argument("--reps", type=int, default=5 if cuda else 3)
    p.add_argument("--warmup", type=int, default=2 if cuda else 1)
    p.add_argument(
        "--logprob-tokens",
        type=int,
        nargs="*",
        default=[] if cuda else [8192],
        help="CPU log-prob path memory at these response-token counts (none: skip)",
    )
    p.add_argument("--full-limit-gib", type=float, default=16.0, help="data limit of the full-logits path's process")
    p.add_argument("--cache-dir", default="~/.cache/rlhf_cluster/models")
    p.add_argument("--out", type=Path, default=result_path("gpu_learner"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    precision = "bf16" if cuda else "none"
    join_one_rank_group()
    model_dir = build_model(args.shape, args.cache_dir)
    from transformers import AutoConfig

    from rlhf_cluster.learner.memory_plan import ModelShape
    from rlhf_cluster.models.flops import FlopsShape

    config = AutoConfig.from_pretrained(model_dir)
    params, active = parameter_counts(config)
    batches = step_batches(args, config.vocab_size)
    sides = side_builds(args, model_dir, precision, batches)
    results = {name: time_side(args, name, build, side_batches) for name, (build, side_batches) in sides.items()}
    ops = op_counts(Ours(model_dir, precision), batches["default"]) if not cuda else None
    dist.destroy_process_group()

    device, peak_flops = device_and_peak()
    moe = args.shape in MOE_SHAPES  # the memory plan's estimate counts no experts: left out
    figures = step_figures(
        results,
        batches,
        FlopsShape.of_config(config, active),
        peak_flops,
        None if moe else ModelShape.of_folder(model_dir),
    )
    memory = logprob_memory(args) if args.logprob_tokens else []
    ours = figures["ours [default]"]
    experts = [r["experts_implementation"] for r in results["ours"].values() if "experts_implementation" in r]
    result = {
        "benchmark": "gpu_learner",
        "machine": machine_info(),
        "config": {
            **{k: v for k, v in vars(args).items() if k != "out"},
            "model": SHAPES[args.shape],
            "vocab": config.vocab_size,
            "parameters": params,
            "active_parameters": active,
            "experts_implementation": (experts or [None])[0],
            "real_tokens": ours["real_tokens"],
            "padded_tokens": ours["padded_tokens"],
            "device": device,
            "precision": precision,
            "bf16_peak_flops": peak_flops,
        },
        "figures": figures,
        "op_counts": ops,
        "logprob_memory": memory,
        "headline": result_headline(args, ours, peak_flops, memory),
    }
    print_report(args, result, ops, memory)
    write_result(args.out, result)
    return 0


def result_headline(args: argparse.Namespace, ours: dict, peak_flops: float | None, memory: list[dict]) -> dict:
    """The one figure the result is read by: ours' real-token MFU on a GPU (on active parameters for
    an MoE), the log-prob path's memory ratio on the CPU."""
    if peak_flops and args.shape in MOE_SHAPES:
        return headline("real-token MFU of ours, active parameters (MoE)", ours.get("mfu"), "report", None, "")
    if peak_flops:
        return headline("real-token MFU of ours", ours.get("mfu"), ">= 0.20 at 0.5B, >= 0.30 at 1.5B", None, "")
    mem_ratio = memory_ratio(args, memory)
    return headline(
        "log-prob path peak memory, chunked / full logits (8k tokens, vocab 151,936)",
        mem_ratio,
        "<= 0.125",
        None if mem_ratio is None else mem_ratio <= 0.125,
        "",
    )


# ---- the steps of main ---------------------------------------------------------------------------
def step_batches(args: argparse.Namespace, vocab: int) -> dict:
    """The default batch (`--batch` sequences of a `--prompt`-token prompt and a `--response` range)
    and one of about each of `--seq-lens` tokens per sequence, by name."""
    batches = {"default": batch_of(args.batch, args.prompt, args.response, vocab)}
    for seq_len in args.seq_lens:
        batches[f"{seq_len}/seq"] = long_batch(seq_len, args.tokens_per_step, vocab)
    return batches


def side_builds(args: argparse.Namespace, model_dir: Path, precision: str, batches: dict) -> dict[str, tuple]:
    """Every side the flags ask for: its builder and the batches it is timed on (the default one,
    and those at `--seq-lens` for `--seq-len-sides`)."""
    at_length = {key: b for key, b in batches.items() if key != "default"}
    default = {"default": batches["default"]}

    def for_side(name: str) -> dict:
        return {**default, **(at_length if name in args.seq_len_sides else {})}

    budget = memory_budget(args)
    sides: dict[str, tuple] = {"ours": (lambda: Ours(model_dir, precision, **budget), for_side("ours"))}
    if args.padded:
        sides["ours, padded"] = (lambda: Ours(model_dir, precision, sequence_packing=False, **budget), default)
    if args.checkpointing:
        sides["ours+ckpt"] = (
            lambda: Ours(model_dir, precision, gradient_checkpointing=True, **budget),
            for_side("ours+ckpt"),
        )
    for attention in args.attention:
        sides[f"ours, {attention}"] = (
            lambda a=attention: Ours(model_dir, precision, attention=a, **budget),
            for_side(f"ours, {attention}"),
        )
    if args.compile:
        sides["ours, compiled"] = (
            lambda: Ours(model_dir, precision, compile=True, **budget),
            for_side("ours, compiled"),
        )
    for name, settings in args.side:
        sides[f"ours, {name}"] = (
            lambda s=settings: Ours(model_dir, precision, **{**budget, **s}),
            for_side(f"ours, {name}"),
        )
    if args.deepspeed:
        sides["ours, deepspeed"] = (
            lambda: Ours(model_dir, precision, backend="deepspeed", **budget),
            for_side("ours, deepspeed"),
        )
    if not torch.cuda.is_available() and args.shape not in MOE_SHAPES:
        sides["ours, before issue 35"] = (lambda: Ours(model_dir, precision, before=True), default)
    if args.plain:
        sides["plain"] = (lambda: Plain(model_dir, precision), for_side("plain"))
    return sides


def memory_budget(args: argparse.Namespace) -> dict:
    """The learner setting that gives the memory plan `--memory-budget-gib` of this GPU (none without it)."""
    if args.memory_budget_gib is None or not torch.cuda.is_available():
        return {}
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    return {"memory_fraction": min(1.0, args.memory_budget_gib / total)}


def learner_side(text: str) -> tuple[str, dict]:
    """`--side NAME:KEY=VALUE[,KEY=VALUE...]`: a side named `ours, NAME` with those learner settings
    (values read as YAML: `compile=true`, `max_tokens_per_micro_batch=8192`, `attention=sdpa`)."""
    import yaml

    name, sep, pairs = text.partition(":")
    settings = {}
    for pair in filter(None, pairs.split(",")):
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise argparse.ArgumentTypeError(f"--side {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
        settings[key.strip()] = yaml.safe_load(value)
    if not sep or not name or not settings:
        raise argparse.ArgumentTypeError(f"--side {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
    return name, settings


def add_side_option(p: argparse.ArgumentParser, example: str) -> None:
    """`--side` (repeatable, read by `learner_side`): more sides of ours, with other learner settings."""
    p.add_argument(
        "--side",
        type=learner_side,
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[,...]",
        help=f"also time ours with these learner settings, as `ours, NAME` (e.g. '{example}')",
    )


def step_figures(results: dict, batches: dict, flops_shape, peak_flops: float | None, shape) -> dict[str, dict]:
    """One row per side and batch: seconds per step, real tokens/s, MFU both ways (6·N, and with
    attention: `rlhf_cluster.models.flops`), peak memory beside the memory plan's estimate (on CUDA),
    and the plain loop's time over this side's on the same batch. `shape` None: no estimate."""
    from rlhf_cluster.learner.memory_plan import estimate
    from rlhf_cluster.models.flops import batch_flops, utilization

    cuda = torch.cuda.is_available()
    figures: dict[str, dict] = {}
    for name, per_batch in results.items():
        for key, got in per_batch.items():
            b = batches[key]
            real = int(b.attention_mask.sum())
            row: dict = {
                "side": name,
                "batch": key,
                "sequences": len(b.input_ids),
                "real_tokens": real,
                "padded_tokens": b.attention_mask.numel(),
            }
            if "error" in got:
                row["error"] = got["error"]
            else:
                sec = statistics.median(got["timings"])
                flops = batch_flops(flops_shape, b.attention_mask.sum(1).tolist())
                mfu = utilization(flops, sec, peak_flops) if peak_flops else None
                row.update(
                    timings=got["timings"],
                    seconds_per_step=sec,
                    real_tokens_per_s=real / sec,
                    mfu=mfu.dense if mfu else None,
                    mfu_with_attention=mfu.with_attention if mfu else None,
                    peak_memory_gib=got["peak_bytes"] / 2**30 if got["peak_bytes"] else None,
                    plan=got["plan"],
                )
                if cuda and shape and got["plan"] is not None and name != "ours, deepspeed":  # the plan's (FSDP2's)
                    # a micro-batch's tokens: the budget, or the longest row where it is longer (it goes alone)
                    longest = int(b.attention_mask.sum(-1).max())
                    tokens = max(min(got["plan"]["micro_batch_tokens"] or real, real), longest)
                    row["estimate_gib"] = estimate(shape, tokens, 1, got["plan"]["checkpointing"]).total / 2**30
            figures[f"{name} [{key}]"] = row
    for row in figures.values():
        plain = figures.get(f"plain [{row['batch']}]", {})
        if "seconds_per_step" in row and "seconds_per_step" in plain:
            row["vs_plain"] = plain["seconds_per_step"] / row["seconds_per_step"]
    return figures


def memory_ratio(args: argparse.Namespace, memory: list[dict]) -> float | None:
    """Chunked over full log-prob path peak memory at the last of `--logprob-tokens` (an upper bound
    where the full path did not fit)."""
    ratio = None
    for tokens in args.logprob_tokens:
        got = {r["path"]: r for r in memory if r["tokens"] == tokens}
        ratio = got["chunked"]["peak_bytes"] / got["full"]["peak_bytes"]
    return ratio


def print_report(args: argparse.Namespace, result: dict, ops: dict | None, memory: list[dict]) -> None:
    cfg, figures = result["config"], result["figures"]
    active = f" ({cfg['active_parameters'] / 1e6:.1f}M active)" if cfg["active_parameters"] != cfg["parameters"] else ""
    print(
        f"\ngpu_learner  {cfg['device']} | {args.shape}: {cfg['parameters'] / 1e6:.1f}M params{active}, "
        f"vocab {cfg['vocab']} | "
        f"default batch {args.batch} sequences, {cfg['real_tokens']} real tokens in {cfg['padded_tokens']} padded | "
        f"{cfg['precision']} | {args.reps} reps (+{args.warmup}), medians; each side alone on the device"
    )
    print_table(
        [
            "side [batch]",
            "seqs",
            "real tok",
            "s/step",
            "real tok/s",
            "MFU",
            "MFU+attn",
            "peak GiB",
            "plan GiB",
            "ckpt",
            "x plain",
        ],
        [
            [
                n,
                f["sequences"],
                f["real_tokens"],
                f.get("seconds_per_step"),
                f.get("real_tokens_per_s"),
                f.get("mfu"),
                f.get("mfu_with_attention"),
                f.get("peak_memory_gib"),
                f.get("estimate_gib"),
                (f.get("plan") or {}).get("checkpointing"),
                f.get("vs_plain"),
            ]
            if "error" not in f
            else [n, f["sequences"], f["real_tokens"], f["error"][:40], None, None, None, None, None, None, None]
            for n, f in figures.items()
        ],
        ["{}", "{}", "{}", "{:.3f}", "{:.0f}", "{:.1%}", "{:.1%}", "{:.2f}", "{:.2f}", "{}", "{:.2f}"],
    )
    if ops:
        print(
            f"aten ops per step (CPU dispatch, ours): {ops['aten_ops_per_step']} "
            f"({ops['copies_per_step']} copies/casts); "
            f"forward ops per decoder layer per micro-batch: "
            f"{ops['forward_aten_ops_per_decoder_layer_per_micro_batch']:.0f}"
        )
    if memory:
        print_table(
            ["log-prob path", "tokens", "peak above inputs"],
            [
                [
                    r["path"],
                    r["tokens"],
                    f"{r['peak_bytes'] / 2**30:.2f} GiB"
                    if r["fits"]
                    else f"> {args.full_limit_gib:.0f} GiB (did not fit)",
                ]
                for r in memory
            ],
            ["{}", "{}", "{}"],
        )


if __name__ == "__main__":
    sys.exit(main())
