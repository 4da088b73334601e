"""A generation worker SIGKILLed mid-run: what it costs with a warm spare (`generation.spares: 1`)
and without one (a new worker starts an engine and loads the newest weights while the step waits).

Each side runs `async_vs_sync`'s demo-like job with `--replicas` generation workers (1 by default:
its loss stops generation until it is replaced) in a local Ray instance of the benchmark's own. When the job has
made `--kill-after` steps, the worker's process is SIGKILLed (as the OOM killer or a lost node
would). Each step's completion is stamped by a watcher polling the job's rows. Per side:

- the median gap between steps before the kill (from step `--warmup-steps` on);
- the gaps from the last step before the kill through the next `--after` steps (with
  `max_staleness` 1 the buffer may hold a step's samples already, so the loss shows a step or two
  later), and the delayed step: the largest of them minus the median;
- the kill's cost (the headline, in median steps; the issue's bound is one): those gaps' sum
  minus the median sum of as many consecutive gaps before the kill. Steps here come in pairs, a
  short and a long one (generation of the next step overlaps the learner's), so a single gap
  over the median overstates a kill that lands on a long one; a window of gaps does not. It
  includes the spare started behind the one taken: on a machine with few cores its engine start
  competes with the job for them.

The sides run in rotated order over `--reps`; the headline is the spare side's median delay in
median steps (target <= 1).

    .venv/bin/python -m benchmarks.spares [--reps 1 --kill-after 12 --after 5 --replicas 1 ...]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import threading
import time
from pathlib import Path

from benchmarks._jobs import run_job_quietly
from benchmarks._timing import median
from benchmarks.async_vs_sync import add_job_args, job_config, parse_job_args
from benchmarks.common import headline, machine_info, print_table, result_path, rotated_jobs, run_script, write_result

TARGET = 1.0  # a kill's cost, in median steps, with a spare
DEFAULT_OUT = result_path("spares")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spares", type=int, nargs="+", default=[0, 1], help="generation.spares per side")
    p.add_argument("--reps", type=int, default=1, help="jobs per side (order rotated)")
    p.add_argument("--kill-after", type=int, default=12, help="steps made before the worker is killed")
    p.add_argument(
        "--after", type=int, default=5, help="steps run after the kill (odd: the gaps come in short-long pairs)"
    )
    p.add_argument("--replicas", type=int, default=1, help="generation workers (one of them is killed)")
    add_job_args(p, steps=1_000_000)
    # Steps of about a second here: a step's generation outlasts the requests a kill loses.
    p.set_defaults(prompts_per_step=16, n=8, max_new_tokens=32)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = parse_job_args(p, argv)
    if args.kill_after < args.warmup_steps + args.after + 2:
        p.error("--kill-after must leave --after + 2 timed steps after --warmup-steps")
    return args


def kill_gaps(stamps: list[float], killed_at: float, warmup: int, after: int) -> dict:
    """From the times steps completed (`stamps`, in order) and the kill's: the median gap before
    the kill (from step `warmup` on); the gaps from the last step before the kill through `after`
    more steps; the kill's delay (the largest of those gaps over the median) and their total
    excess over it (the whole cost)."""
    before = [t for t in stamps if t <= killed_at]
    later = [t for t in stamps if t > killed_at]
    if len(before) < warmup + after + 2 or len(later) < after + 1:
        raise ValueError(f"too few steps around the kill: {len(before)} before, {len(later)} after")
    gaps = [b - a for a, b in zip(before[warmup:], before[warmup + 1 :])]
    step = statistics.median(gaps)
    around = [b - a for a, b in zip([before[-1], *later], later)][: after + 1]
    window = statistics.median(sum(gaps[i : i + len(around)]) for i in range(len(gaps) - len(around) + 1))
    return {
        "median_step_s": step,
        "gaps_before_kill_s": gaps,
        "gaps_after_kill_s": around,
        "delay_s": max(around) - step,
        "delay_steps": (max(around) - step) / step,
        "cost_s": sum(around) - window,
        "cost_steps": (sum(around) - window) / step,
    }


def run_side(args: argparse.Namespace, spares: int, rep: int, run_dir: Path) -> dict:
    """One job: killed after `--kill-after` steps, stopped `--after` steps later."""
    from actors.job import Job

    cfg = job_config(args, 1, rep, run_dir)
    cfg = cfg.model_copy(
        update={
            "name": f"bench-spares-{spares}-r{rep}-{os.getpid()}",
            "generation": cfg.generation.model_copy(update={"spares": spares, "replicas": args.replicas}),
            "faults": cfg.faults.model_copy(update={"max_worker_restarts": 2}),
        }
    )
    stamps: list[float] = []
    kill: dict = {}
    jobs: list[Job] = []

    def watch() -> None:
        while not jobs:
            time.sleep(0.01)
        job, seen = jobs[0], 0
        try:
            while len(stamps) < args.kill_after + 1 + args.after:
                n = len(job.rows)
                stamps.extend([time.monotonic()] * (n - seen))
                seen = n
                if n >= args.kill_after and not kill:
                    pid = job.worker_infos("generation")[next(iter(job.workers("generation")))]["pid"]
                    os.kill(pid, signal.SIGKILL)
                    kill["at"] = time.monotonic()
                time.sleep(0.01)
        finally:
            job.stop()

    threading.Thread(target=watch, daemon=True).start()
    result = run_job_quietly(cfg, args.verbose, on_start=jobs.append)
    events = [e for e in (Path(cfg.run_dir) / "events.jsonl").read_text().splitlines() if "worker_replaced" in e]
    return {"spares": spares, "rep": rep, "steps": len(result.rows), "replaced": events,
            **kill_gaps(stamps, kill["at"], args.warmup_steps, args.after)}  # fmt: skip


def run_line(run: dict) -> str:
    return (
        f"step {run['median_step_s']:.2f}s, gaps from the kill on "
        f"{[round(g, 2) for g in run['gaps_after_kill_s']]} (cost {run['cost_steps']:.2f} steps)"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sides = tuple(args.spares)
    runs = rotated_jobs(args, "bench-spares-", "spares", sides, run_side, run_line)
    per = {s: {k: median(r[k] for r in runs if r["spares"] == s)
               for k in ("median_step_s", "delay_s", "delay_steps", "cost_s", "cost_steps")}
           for s in sides}  # fmt: skip
    print_table(
        ["spares", "median step s", "delayed step s", "in steps", "cost s", "cost in steps"],
        [[s, *per[s].values()] for s in sides],
        ["{}", "{:.2f}", "{:.2f}", "{:.2f}", "{:.2f}", "{:.2f}"],
    )
    head = max(sides)
    value = per[head]["cost_steps"]
    write_result(
        args.out,
        {
            "benchmark": "spares",
            "machine": machine_info(),
            "config": {k: v for k, v in vars(args).items() if k != "out"},
            "runs": runs,
            "per_side": {str(s): v for s, v in per.items()},
            "headline": headline(
                f"a kill's cost with {head} spare(s), in median steps", value, f"<= {TARGET}", value <= TARGET, "steps"
            ),
        },
    )
    return 0


if __name__ == "__main__":
    run_script(main)
