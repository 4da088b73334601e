"""What the learning benchmarks share (a shipped job per seed and side, its held-out accuracy
before and after): their parser, the overrides they put on the job config, the loop over seeds and
sides, the held-out figures, whether a side beats its control, and the result file.

Not a benchmark itself (scripts/run_benchmarks.sh skips modules whose names start with `_`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.common import args_config, machine_info, print_table, result_path, write_result


def job_overrides(
    run_dir: Path | str, cache_dir: str, seed: int, name: str, steps: int | None, eval_every: int = 0
) -> list[str]:
    """The `--set` overrides a learning benchmark puts on a shipped job config (the demo's, the tool
    demo's) for each of its jobs: its run directory, model cache, seed and name; no progress bar,
    no metrics endpoint, no checkpoint before the last step; a held-out evaluation every
    `eval_every` steps (0: before and after only); `steps` learner steps (None: the config's)."""
    sets = [
        f"run_dir={run_dir}",
        f"model.cache_dir={cache_dir}",
        f"seed={seed}",
        "train.progress=false",
        f"name={name}",
        "metrics.enabled=false",
        "checkpoint.every_steps=1000000",
        f"data.eval_every_steps={eval_every}",
    ]
    if steps is not None:
        sets.append(f"train.total_steps={steps}")
    return sets


def jobs_parser(
    doc: str, name: str, steps: int | None, sides: Sequence[str] = (), steps_help: str = "learner steps of every job"
) -> argparse.ArgumentParser:
    """The parser of a learning benchmark (a shipped job per seed and side, described by its
    docstring's first paragraph): --seeds, --steps, --sides (where it has `sides`: all by default),
    --cache-dir, --verbose and --out (benchmarks/results/<name>.json). The benchmark adds its own."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="job seeds")
    p.add_argument("--steps", type=int, default=steps, help=steps_help)
    if sides:
        p.add_argument("--sides", nargs="+", default=list(sides), choices=list(sides))
    p.add_argument("--cache-dir", default="~/.cache/rlhf_cluster/models")
    p.add_argument("--verbose", action="store_true", help="show the jobs' own lines")
    p.add_argument("--out", type=Path, default=result_path(name), help="JSON results file")
    return p


def held_out(result) -> dict:
    """A job's sampled held-out accuracy (30 sums never trained on, as the demo reports it) before
    and after its training, and the gain between them."""
    return {
        "sampled_before": result.sampled_accuracy_before,
        "sampled_after": result.sampled_accuracy_after,
        "gain": result.sampled_accuracy_after - result.sampled_accuracy_before,
    }


def held_out_text(job: dict) -> str:
    """A job's `held_out` figures as its line says them: before -> after (gain)."""
    return f"sampled held-out {job['sampled_before']:.3f} -> {job['sampled_after']:.3f} ({job['gain']:+.3f})"


def gains_by_side(jobs: list[dict], sides: Sequence[str], key: str = "side") -> dict[str, list[float]]:
    """Per side, the gains of its jobs in the order they ran (`job[key]` names the job's side)."""
    return {side: [j["gain"] for j in jobs if j[key] == side] for side in sides}


def print_jobs(
    jobs: list[dict], side: str, key: str = "side", more: dict[str, Callable[[dict], str]] | None = None
) -> None:
    """The table of the jobs' held-out figures: the job's side (column `side`, `job[key]`), seed,
    before, after and gain, then a column per entry of `more` (its title: how a job's cell reads)."""
    more = more or {}
    print_table(
        [side, "seed", "before", "after", "gain", *more],
        [
            [j[key], j["seed"], j["sampled_before"], j["sampled_after"], j["gain"], *(f(j) for f in more.values())]
            for j in jobs
        ],
        ["{}", "{}", "{:.3f}", "{:.3f}", "{:+.3f}", *["{}"] * len(more)],
    )


def write_jobs(
    args: argparse.Namespace,
    name: str,
    final: bool,
    seconds: float,
    jobs: list[dict],
    gains: dict[str, list[float]],
    top: dict,
    **extra,
) -> None:
    """A learning benchmark's result file, rewritten after every job (a cut-off run keeps what it
    measured, marked `complete: false`): its options, `extra`, every job, the gains per side and
    the headline `top`."""
    write_result(
        args.out,
        {
            "benchmark": name,
            "machine": machine_info(),
            "complete": final,
            "seconds": seconds,
            "config": args_config(args),
            **extra,
            "jobs": jobs,
            "gains": gains,
            "headline": top,
        },
    )


def run_per_seed(
    args: argparse.Namespace,
    job: Callable[[str, int], dict],
    show: Callable[[dict], str],
    report: Callable[[list[dict], float, bool], None],
    started: float,
) -> list[dict]:
    """Per seed of `args.seeds`, per side of `args.sides`: `job(side, seed)`, the job's figures,
    with the seconds it took added; `show(figures)` printed, then `report(jobs so far, seconds since
    `started`, final=False)`, so the result file is rewritten after every job. Returns every job's."""
    jobs: list[dict] = []
    for seed in args.seeds:
        for side in args.sides:
            start = time.perf_counter()
            figures = job(side, seed)
            jobs.append({**figures, "seconds": time.perf_counter() - start})
            print(show(jobs[-1]), flush=True)
            report(jobs, time.perf_counter() - started, False)
    return jobs


def beats_control(gains: dict[str, list[float]], side: str, control: str) -> bool:
    """Whether `side` learns: every one of its seeds gained, and by more than the control's best
    seed (which may be a loss: then by more than nothing)."""
    return bool(gains.get(side)) and bool(gains.get(control)) and min(gains[side]) > max(max(gains[control]), 0.0)
