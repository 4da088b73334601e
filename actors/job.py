"""Job: the public handle of a running job, for the CLI, benchmarks and tests.

It answers what an operator asks of a job (status, versions, consumed samples, pools, the
learner's ranks) and steers it (run, stop, shutdown), so nothing outside the driver's room
depends on how the driver is built inside.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from actors.driver import Driver
from actors.reporting import ConsumedSample, JobResult
from rlhf_cluster.config import JobConfig
from rlhf_cluster.job.preemption import GracefulStop
from rlhf_cluster.weights.messages import Receipt


class Job:
    """One job on the connected Ray cluster (the caller has called `ray.init`): started on
    construction (actors up, version 0 or the resumed checkpoint's published), trained by `run`."""

    def __init__(self, cfg: JobConfig, resume: str | None = None, overwrite: bool | str | None = False):
        self._driver = Driver(cfg, resume, overwrite)

    # ---- steering ------------------------------------------------------------------------
    def run(self) -> JobResult:
        """Train to the last step (or a requested stop); blocks. Raises the first failure's cause,
        recorded first as events.jsonl's `failed` row."""
        try:
            return asyncio.run(self._driver.run())
        except Exception as exc:
            self._driver.record_failure(exc)
            raise

    async def run_async(self) -> JobResult:
        try:
            return await self._driver.run()
        except Exception as exc:
            self._driver.record_failure(exc)
            raise

    def stop(self) -> None:
        """End after the step in progress, with a checkpoint; safe from any thread."""
        self._driver.stop.request()

    def shutdown(self) -> None:
        """End every actor of the job."""
        self._driver.shutdown()

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- status --------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return self._driver.run_dir.root

    @property
    def checkpoint_dir(self) -> Path:
        return self._driver.run_dir.checkpoint_dir

    @property
    def metrics_port(self) -> int | None:
        """The driver's own /metrics port (None when metrics are off)."""
        return self._driver.metrics_port

    @property
    def published_version(self) -> int:
        """The newest weight version the learner has published (durable in the store)."""
        return self._driver.learner.published_version

    @property
    def rows(self) -> list[dict]:
        """The rows of the steps done so far (a copy)."""
        return list(self._driver.reporter.result.rows)

    @property
    def consumed(self) -> list[ConsumedSample]:
        """Every sample trained on so far, with its provenance (a copy)."""
        return list(self._driver.reporter.result.consumed)

    @property
    def delivery_receipts(self) -> list[Receipt]:
        """Each engine's receipt of each delivered version (worker, version, variant, status, the
        fingerprint of what it loaded and the learner's, or the reason it refused), in order, the
        newest 10,000 (a copy)."""
        return list(self._driver.weights.receipts)

    @property
    def learner_restarts(self) -> int:
        return self._driver.learner.restarts

    @property
    def dropped(self) -> dict[str, int]:
        """Samples the buffer refused or dropped, by reason (`stale`, `duplicate`), and those dropped
        before it (`zero_signal`, `reward_failed`)."""
        state = self._driver.learner.state
        return {"stale": 0, "duplicate": 0, **state.buffer.dropped, **state.dropped}

    def pool_sizes(self) -> dict[str, int]:
        """Workers per pool (`generation`, `reward`, and `reference` unless LoRA serves it)."""
        return self._driver.cluster.pool_sizes()

    def workers(self, pool: str) -> dict:
        """The actor handles of a pool's workers in rotation, by name."""
        return dict(self._driver.cluster.pools[pool].actors)

    def spares(self, pool: str) -> dict:
        """The actor handles of a pool's warm spares (started, loaded, out of rotation), by name."""
        return dict(self._driver.cluster.pools[pool].spares)

    def worker_infos(self, pool: str) -> dict[str, dict]:
        """What each worker of a pool reported at start (metrics endpoint, pid, ...), by name."""
        return dict(self._driver.cluster.infos[pool])

    def restarts(self, pool: str) -> int:
        """Workers of `pool` replaced after a failure."""
        return self._driver.cluster.pools[pool].restarts

    @property
    def learner_ranks(self) -> list:
        """The policy learner's rank actors (rank order), for collective calls such as `full_state_dict`."""
        return list(self._driver.learner.trainer.policy.ranks)

    def learner_pids(self) -> list[int]:
        return self._driver.learner.trainer.policy.pids()

    def status(self) -> dict:
        """A summary: steps done, the published version, pool sizes, restarts and drops."""
        return {
            "steps": len(self._driver.reporter.result.rows),
            "version": self.published_version,
            "pools": self.pool_sizes(),
            "learner_restarts": self.learner_restarts,
            "dropped": self.dropped,
        }


def run_job(
    cfg: JobConfig, resume: str | None = None, stop: GracefulStop | None = None, overwrite: bool | str | None = False
) -> JobResult:
    """Run (or with `resume`, continue) one job to its end on the connected Ray cluster; `stop`
    (active in the main thread) lets SIGTERM/SIGINT end it early with a checkpoint; `overwrite`
    lets a fresh job replace an earlier run in its run_dir."""
    with Job(cfg, resume, overwrite) as job:
        if stop is not None:
            stop.attach(job)
        return job.run()
