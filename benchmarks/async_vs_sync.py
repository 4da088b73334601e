"""Async vs sync RL: the same job with `train.max_staleness` 0 (synchronous) vs 1 vs 2.

One local Ray instance (own temp dir, no dashboard) runs every job; each job is a full
`Job(cfg)` -> `job.run()` -> `job.shutdown()` with its own run_dir: a generation worker
(vLLM), a reward and a reference worker, an FSDP2 learner, the weight store, admission control.
The config is built here, demo-like: the tiny random Qwen2, the built-in arithmetic task, GRPO
with token TIS and k3 KL, but longer responses (16 tokens x n=4 x 8 prompts per step) so that
generation is a real share of a step.

The three settings run in rotated order over `--reps` repetitions (0-1-2, 1-2-0, 2-0-1, ...).
Per job: the median `step_seconds` of the steps after `--warmup-steps` (wall time between two
consecutive learner steps, as the driver logs it), samples/s over those steps, the learner's
share of a step, and the final reward (mean `reward_mean` of the last `--final-steps` steps).
Per setting: the median over repetitions; ratios are to max_staleness 0.

On a machine with few cores, generation and training compete for the same cores, so running
them concurrently (async) may gain little over taking turns (sync): the numbers say what this
machine does, not what a cluster with separate generation and learner nodes does.

    .venv/bin/python -m benchmarks.async_vs_sync [--staleness 0 1 2 --reps 2 --steps 10 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._timing import median
from benchmarks.common import headline, machine_info, print_table, result_path, rotated_jobs, run_script, write_result

TARGET = 1.3  # async samples/s >= 1.3x sync
DEFAULT_OUT = result_path("async_vs_sync")


def add_job_args(p: argparse.ArgumentParser, steps: int) -> None:
    """The options of the job `job_config` builds (tracing_overhead.py runs it too): its size,
    `--steps` per job of which the first `--warmup-steps` are not timed, and `--verbose`."""
    p.add_argument("--steps", type=int, default=steps, help="learner steps per job")
    p.add_argument("--warmup-steps", type=int, default=3, help="first steps of a job left out of the timing")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--n", type=int, default=4, help="responses per prompt (GRPO group)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--prompts-per-request", type=int, default=4)
    p.add_argument("--world-size", type=int, default=1, help="learner ranks")
    p.add_argument("--hidden", type=int, default=64, help="tiny model width (the demo's: 64)")
    p.add_argument("--layers", type=int, default=2, help="tiny model layers (the demo's: 2)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--cache-dir", default="~/.cache/rlhf_cluster/models", help="tiny model cache")
    p.add_argument("--verbose", action="store_true", help="show the driver's per-step lines and actor logs")


def parse_job_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`p.parse_args(argv)` with the options of `add_job_args`: some steps must be timed."""
    args = p.parse_args(argv)
    if args.steps <= args.warmup_steps:
        p.error("--steps must be larger than --warmup-steps")
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--staleness", type=int, nargs="+", default=[0, 1, 2], help="max_staleness settings (the first is the baseline)"
    )
    p.add_argument("--reps", type=int, default=2, help="jobs per setting (order rotated)")
    p.add_argument(
        "--final-steps", type=int, default=3, help="last steps whose reward_mean is averaged as the final reward"
    )
    add_job_args(p, steps=20)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = parse_job_args(p, argv)
    if args.reps < 1:
        p.error("--reps must be >= 1")
    return args


def job_config(args: argparse.Namespace, staleness: int, rep: int, run_dir: Path):
    from rlhf_cluster.config import JobConfig

    heads = max(1, args.hidden // 32)
    return JobConfig.model_validate(
        {
            "name": f"bench-async-s{staleness}-r{rep}-{os.getpid()}",  # the job's controller actor is named after it
            "run_dir": str(run_dir),
            "model": {
                "cache_dir": args.cache_dir,
                "tiny": {
                    "architecture": "qwen2",
                    "hidden_size": args.hidden,
                    "num_layers": args.layers,
                    "num_heads": heads,
                    "num_kv_heads": max(1, heads // 2),
                    "intermediate_size": 2 * args.hidden,
                },
            },
            "data": {"task": "arithmetic", "num_prompts": 1024, "eval_prompts": 0},
            "generation": {
                "replicas": 1,
                "prompts_per_request": args.prompts_per_request,
                "sampling": {"n": args.n, "temperature": 1.0, "max_new_tokens": args.max_new_tokens},
            },
            "scoring": {"reward_replicas": 1, "reference_replicas": 1},
            "algorithm": {
                "advantage": "grpo",
                "kl": {"placement": "loss", "estimator": "k3", "coef": 0.01},
                "correction": {"enabled": True, "level": "token", "mode": "truncate", "cap": 2.0},
            },
            "learner": {"world_size": args.world_size, "lr": args.lr},
            "train": {
                "total_steps": args.steps,
                "prompts_per_step": args.prompts_per_step,
                "max_staleness": staleness,
                "progress": False,
            },
            # Only the final checkpoint (written after the last step's row, so outside every timing).
            "checkpoint": {"every_steps": 1_000_000},
            "metrics": {"enabled": False},
        }
    )


def run_job(args: argparse.Namespace, staleness: int, rep: int, run_dir: Path) -> dict:
    from actors.job import Job

    cfg = job_config(args, staleness, rep, run_dir)
    log = io.StringIO()
    redirect = contextlib.nullcontext() if args.verbose else contextlib.redirect_stdout(log)
    t0 = time.perf_counter()
    try:
        with redirect:
            job = Job(cfg)
            started = time.perf_counter()
            try:
                result = job.run()
            finally:
                job.shutdown()
    except BaseException:
        sys.stdout.write(log.getvalue()[-4000:])
        raise
    finished = time.perf_counter()
    rows = result.rows
    timed = rows[args.warmup_steps :]
    step_s = [r["step_seconds"] for r in timed]
    samples = sum(r["samples"] for r in timed)
    return {
        "max_staleness": staleness,
        "rep": rep,
        "startup_seconds": started - t0,
        "run_seconds": finished - started,
        "median_step_seconds": statistics.median(step_s),
        "samples_per_s": samples / sum(step_s),
        "learner_share": sum(r["learner_seconds"] for r in timed) / sum(step_s),
        "final_reward": statistics.fmean(r["reward_mean"] for r in rows[-args.final_steps :]),
        "staleness_mean": statistics.fmean(r["staleness_mean"] for r in timed),
        "dropped_stale": rows[-1]["dropped_stale"],
        "rows": [
            {
                k: r[k]
                for k in (
                    "step",
                    "step_seconds",
                    "learner_seconds",
                    "samples",
                    "reward_mean",
                    "kl",
                    "staleness_mean",
                    "staleness_max",
                    "response_len_mean",
                )
            }
            for r in rows
        ],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = tuple(args.staleness)
    base = settings[0]
    t0 = time.perf_counter()
    jobs = run_jobs(args, settings)
    total_s = time.perf_counter() - t0
    per = per_setting(args, jobs, settings)
    print_report(args, per, settings)
    head_s = 1 if 1 in settings and base == 0 else settings[-1]
    value = per[head_s]["samples_per_s_ratio_to_base"]
    print(
        f"samples/s max_staleness={head_s} / max_staleness={base}: {value:.2f} (target >= {TARGET}); "
        f"total {total_s:.0f}s"
    )
    result = {
        "benchmark": "async_vs_sync",
        "machine": machine_info(),
        "config": {
            **{k: v for k, v in vars(args).items() if k != "out"},
            "job_config": job_config(args, base, 0, Path("RUN_DIR")).model_dump(),
        },
        "jobs": jobs,
        "per_setting": {str(s): v for s, v in per.items()},
        "total_seconds": total_s,
        "headline": headline(
            f"samples/s max_staleness={head_s} / max_staleness={base}", value, f">= {TARGET}x", value >= TARGET, "x"
        ),
    }
    write_result(args.out, result)
    return 0


def run_jobs(args: argparse.Namespace, settings: tuple[int, ...]) -> list[dict]:
    """`--reps` jobs per setting, the settings' order rotated each repetition, in one local Ray instance."""
    return rotated_jobs(args, "bench-async-", "max_staleness", settings, run_job, job_line)


def job_line(job: dict) -> str:
    return (
        f"median step {job['median_step_seconds']:.3f}s, "
        f"{job['samples_per_s']:.1f} samples/s, learner {job['learner_share']:.0%} of a step, "
        f"final reward {job['final_reward']:+.3f} (job {job['startup_seconds']:.0f}s start + "
        f"{job['run_seconds']:.0f}s run)"
    )


def per_setting(args: argparse.Namespace, jobs: list[dict], settings: tuple[int, ...]) -> dict[int, dict]:
    """Per setting: the medians over its jobs, and its ratios to the first setting's (also paired per repetition)."""
    base = settings[0]
    per: dict[int, dict[str, Any]] = {}
    for s in settings:
        mine = [j for j in jobs if j["max_staleness"] == s]
        keys = ("median_step_seconds", "samples_per_s", "learner_share", "final_reward", "staleness_mean")
        per[s] = {k: median(j[k] for j in mine) for k in keys}
        per[s]["pooled_median_step_seconds"] = median(
            r["step_seconds"] for j in mine for r in j["rows"][args.warmup_steps :]
        )
    for s in settings:
        per[s]["step_time_ratio_to_base"] = per[s]["median_step_seconds"] / per[base]["median_step_seconds"]
        per[s]["samples_per_s_ratio_to_base"] = per[s]["samples_per_s"] / per[base]["samples_per_s"]
        # Within one repetition the jobs ran back to back, so their ratio shares the machine's mood.
        by_rep = {(j["max_staleness"], j["rep"]): j["samples_per_s"] for j in jobs}
        per[s]["paired_samples_per_s_ratios"] = [by_rep[(s, r)] / by_rep[(base, r)] for r in range(args.reps)]
        per[s]["median_paired_ratio"] = median(per[s]["paired_samples_per_s_ratios"])
    return per


def print_report(args: argparse.Namespace, per: dict[int, dict], settings: tuple[int, ...]) -> None:
    print(
        f"\nasync_vs_sync  tiny Qwen2 hidden={args.hidden} layers={args.layers} | {args.prompts_per_step} prompts x "
        f"n={args.n} x <= {args.max_new_tokens} tokens per step | learner world_size {args.world_size} | "
        f"{args.steps} steps per job ({args.warmup_steps} warmup) | {args.reps} jobs per setting, medians | "
        f"{os.cpu_count()} CPUs"
    )
    headers = [
        "max_staleness",
        "s/step",
        "samples/s",
        "step time vs sync",
        "samples/s vs sync",
        "paired (per rep)",
        "learner share",
        "staleness mean",
        "final reward",
    ]
    rows = [
        [
            str(s),
            p["median_step_seconds"],
            p["samples_per_s"],
            p["step_time_ratio_to_base"],
            p["samples_per_s_ratio_to_base"],
            " ".join(f"{x:.2f}" for x in p["paired_samples_per_s_ratios"]),
            p["learner_share"],
            p["staleness_mean"],
            p["final_reward"],
        ]
        for s, p in per.items()
    ]
    print_table(headers, rows, ["{}", "{:.3f}", "{:.1f}", "{:.2f}", "{:.2f}", "{}", "{:.0%}", "{:.2f}", "{:+.3f}"])


if __name__ == "__main__":
    run_script(main)
