"""Tracing overhead: the same demo-like job with `metrics.trace` on and off, side by side.

Jobs alternate (on-off, off-on, ...) in one local Ray instance, each a full `Job(cfg)` ->
`job.run()` with the configuration of `async_vs_sync.py` (max_staleness 1). Per job: the median
`step_seconds` after the warm-up steps; per repetition the on/off ratio of the two (they ran back
to back); the headline is the median of those ratios. Also reported: spans recorded per step and
trace bytes per step, what the driver writes to `trace.jsonl`.

    .venv/bin/python -m benchmarks.tracing_overhead [--reps 3 --steps 16 ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from benchmarks._jobs import local_ray, run_job_quietly
from benchmarks._timing import median, rotated
from benchmarks.async_vs_sync import add_job_args, job_config, parse_job_args
from benchmarks.common import headline, machine_info, print_table, result_path, run_script, write_result

TARGET = 1.02  # tracing may cost at most 2% of step time
DEFAULT_OUT = result_path("tracing_overhead")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="job pairs (order alternated)")
    add_job_args(p, steps=16)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parse_job_args(p, argv)


def run_job(args: argparse.Namespace, trace: bool, rep: int, run_dir: Path) -> dict:
    cfg = job_config(args, 1, rep, run_dir)
    cfg = cfg.model_copy(
        update={
            "name": f"bench-trace-{'on' if trace else 'off'}-r{rep}-{os.getpid()}",
            "metrics": cfg.metrics.model_copy(update={"trace": trace}),
        }
    )
    rows = run_job_quietly(cfg, args.verbose).rows
    timed = rows[args.warmup_steps :]
    trace_file = run_dir / "trace.jsonl"
    spans = len(trace_file.read_text().splitlines()) if trace_file.exists() else 0
    return {
        "trace": trace,
        "rep": rep,
        "median_step_seconds": statistics.median(r["step_seconds"] for r in timed),
        "spans_per_step": spans / len(rows),
        "trace_bytes_per_step": (trace_file.stat().st_size if spans else 0) / len(rows),
        "step_seconds": [r["step_seconds"] for r in rows],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jobs: list[dict] = []
    t0 = time.perf_counter()
    with local_ray(args.verbose, "bench-trace-") as runs:
        for rep in range(args.reps):
            for side in rotated(("on", "off"), rep):
                job = run_job(args, side == "on", rep, runs / f"{side}-r{rep}")
                jobs.append(job)
                print(
                    f"  rep {rep} trace {side}: median step {job['median_step_seconds']:.3f}s, "
                    f"{job['spans_per_step']:.0f} spans/step",
                    flush=True,
                )
                time.sleep(2)
    by = {(j["trace"], j["rep"]): j for j in jobs}
    paired = [by[(True, r)]["median_step_seconds"] / by[(False, r)]["median_step_seconds"] for r in range(args.reps)]
    value = median(paired)
    on = [j for j in jobs if j["trace"]]
    print(
        f"\ntracing_overhead  {args.prompts_per_step} prompts x n={args.n} x <= {args.max_new_tokens} tokens "
        "per step | "
        f"{args.steps} steps per job ({args.warmup_steps} warmup) | {args.reps} pairs | {os.cpu_count()} CPUs"
    )
    print_table(
        ["trace", "median s/step (median over jobs)"],
        [
            [side, median(j["median_step_seconds"] for j in jobs if j["trace"] == (side == "on"))]
            for side in ("on", "off")
        ],
        ["{}", "{:.3f}"],
    )
    print(
        f"step time on/off, per pair: {' '.join(f'{x:.3f}' for x in paired)}; median {value:.3f} (target <= {TARGET}); "
        f"{median(j['spans_per_step'] for j in on):.0f} spans and "
        f"{median(j['trace_bytes_per_step'] for j in on) / 1024:.1f} KiB "
        f"of trace per step; total {time.perf_counter() - t0:.0f}s"
    )
    write_result(
        args.out,
        {
            "benchmark": "tracing_overhead",
            "machine": machine_info(),
            "config": {k: v for k, v in vars(args).items() if k != "out"},
            "jobs": jobs,
            "paired_ratios_on_over_off": paired,
            "headline": headline("step time trace on / off", value, f"<= {TARGET}", value <= TARGET, "x"),
        },
    )
    return 0


if __name__ == "__main__":
    run_script(main)
