"""Running jobs and actors in a local Ray instance of the benchmark's own: `local_ray` for a
benchmark's jobs, `in_local_ray` for its actors, `run_job_quietly` for one job.

Not a benchmark itself (scripts/run_benchmarks.sh skips modules whose names start with `_`).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path


@contextlib.contextmanager
def local_ray(verbose: bool, prefix: str, system_config: dict | None = None):
    """A local Ray instance of the benchmark's own (temp dir, no dashboard; Ray's `_system_config`
    where given) for its jobs; yields a scratch directory for their run dirs. Both are removed
    afterwards."""
    import ray

    ray_tmp = tempfile.mkdtemp(prefix="rlhf-ray-", dir="/tmp")
    runs = Path(tempfile.mkdtemp(prefix=prefix))
    ray.init(
        address="local",
        num_cpus=max(4, os.cpu_count() or 1),
        include_dashboard=False,
        _temp_dir=ray_tmp,
        log_to_driver=verbose,
        _system_config=system_config,
    )
    try:
        yield runs
    finally:
        ray.shutdown()
        shutil.rmtree(runs, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def run_job_quietly(cfg, verbose: bool, on_start: Callable | None = None):
    """`Job(cfg).run()` then shutdown, the driver's lines kept back unless `verbose` (shown if it
    fails); `on_start(job)` once its pools are up, before it runs (e.g. for a watcher thread)."""
    from actors.job import Job

    log = io.StringIO()
    try:
        with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(log):
            job = Job(cfg)
            if on_start is not None:
                on_start(job)
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
