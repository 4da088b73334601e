"""What the benchmarks that run jobs share: a local Ray instance of their own, a job run quietly,
the overrides every learning benchmark puts on a shipped job config, and the learning benchmarks'
parser, held-out figures and result file.

Not a benchmark itself (scripts/run_benchmarks.sh skips modules whose names start with `_`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.common import args_config, machine_info, result_path, write_result


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


@contextlib.contextmanager
def local_ray(verbose: bool, prefix: str):
    """A local Ray instance of the benchmark's own (temp dir, no dashboard) for its jobs; yields a
    scratch directory for their run dirs. Both are removed afterwards."""
    import ray

    ray_tmp = tempfile.mkdtemp(prefix="rlhf-ray-", dir="/tmp")
    runs = Path(tempfile.mkdtemp(prefix=prefix))
    ray.init(
        address="local",
        num_cpus=max(4, os.cpu_count() or 1),
        include_dashboard=False,
        _temp_dir=ray_tmp,
        log_to_driver=verbose,
    )
    try:
        yield runs
    finally:
        ray.shutdown()
        shutil.rmtree(runs, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def run_job_quietly(cfg, verbose: bool):
    """`Job(cfg).run()` then shutdown, the driver's lines kept back unless `verbose` (shown if it fails)."""
    from actors.job import Job

    log = io.StringIO()
    try:
        with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(log):
            job = Job(cfg)
            try:
                return job.run()
            finally:
                job.shutdown()
    except BaseException:
        sys.stdout.write(log.getvalue()[-4000:])
        raise


def in_local_ray(prefix: str, run: Callable[[Path], int], parent: str | None = None) -> int:
    """`run(work)` with a temp work directory (under `parent`) and a local Ray instance of its own,
    both gone afterwards; returns what `run` returns."""
    import ray

    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, _temp_dir=str(work / "ray"))
    try:
        return run(work)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


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


def write_jobs_result(
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
