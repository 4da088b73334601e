"""The job's worker pools (one per row of `actors/workers/pool_table.py`: generation, reward,
reference or distillation's teacher, judge), its scaling controller and the Prometheus scrape
targets of every actor it runs. The calls a rollout makes to the scoring pools are `scoring`'s
(`actors/workers/scoring_calls.py`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.workers._common import heartbeat
from actors.workers.autoscaling import PoolAutoscaling
from actors.workers.control import NAMESPACE, JobController, controller_name
from actors.workers.pool_table import pool_rows
from actors.workers.pools import STARTUP_TIMEOUT_S, ActorPool
from actors.workers.reference_refresh import ReferenceRefresh
from actors.workers.scoring_calls import ScoringCalls
from actors.workers.weight_sync import WeightSync
from rlhf_cluster.config import JobConfig
from rlhf_cluster.models.quantization import write_int8_model_dir
from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.telemetry import metrics as m
from rlhf_cluster.telemetry.tracing import PoolActivity
from rlhf_cluster.weights import WeightStore

log = logging.getLogger(__name__)


def engine_model_paths(
    cfg: JobConfig, model_path: str, store: WeightStore, version: int, run_dir: RunDir
) -> dict[str, str]:
    """What generation engines start from, by weight variant: the model folder (`full`), and for
    int8 rollouts an int8 checkpoint of `version`'s int8 variant (written once; workers then sync)."""
    paths = {"full": model_path}
    if "int8" in cfg.generation.weight_variants:
        paths["int8"] = str(
            write_int8_model_dir(model_path, store.load(version, variant="int8"), run_dir / RunDir.ENGINE_INT8)
        )
    return paths


def _named_controller(job_name: str, wait_s: float = 60.0):
    """The job's JobController. A driver that just died (and is being resumed) still holds the
    name until Ray has reaped its actors: wait for that, a bounded time."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            # On the driver's node: it shares the driver's fate anyway, and a lost worker node
            # (e.g. a learner's, with `faults.elastic`) must not take the job's control down.
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            # `.options`: @ray.remote made the class an ActorClass, which mypy (ignoring class decorators) cannot see.
            return JobController.options(  # type: ignore[attr-defined]  # ActorClass
                name=controller_name(job_name), namespace=NAMESPACE, get_if_exists=False, scheduling_strategy=here
            ).remote()
        except ValueError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"a job named {job_name!r} is already running on this cluster (its controller "
                    f"{controller_name(job_name)} exists); give this job another `name`"
                ) from None
            time.sleep(1.0)


class Cluster:
    """Starts, resizes, replaces and ends the job's worker pools (the rows of its pool table), and
    keeps the scrape targets current. A new generation worker joins through `weights` (the job's
    `WeightSync`, which pushes every version to the generation pool); `other_targets()` adds the
    rank groups' and the driver's endpoints to the scrape targets. `scoring`: the job's scoring
    calls, over its pools."""

    def __init__(
        self,
        cfg: JobConfig,
        run_dir: RunDir,
        model_path: str,
        engine_paths: dict[str, str],
        other_targets: Callable[[], dict[str, dict[str, dict]]],
        weights: WeightSync,
        reference: ReferenceRefresh,
    ):
        self.cfg, self.run_dir = cfg, run_dir
        self.other_targets = other_targets
        self.infos: dict[str, dict[str, dict]] = {}
        self.controller = None
        self.activity = PoolActivity()  # every pool's requests in flight, for each step's busy share
        rows = pool_rows(cfg, model_path, engine_paths, run_dir / RunDir.JUDGE_INT8, reference.model_path)
        # A new worker loads, before it serves: the newest version (generation), the current reference (reference).
        prepares = {"weights": weights.join, "reference": reference.join}
        self.pools: dict[str, ActorPool] = {
            row.name: row.pool(cfg.faults, self.activity, self._on_restart, prepares, self._register) for row in rows
        }
        weights.serve(self.pools["generation"])  # every version is pushed to the generation pool
        reference.serve(self.pools.get("reference"))  # every refresh is loaded by the reference pool
        self.scoring = ScoringCalls(self.pools, {row.name: row.joined for row in rows})
        self._resizing = asyncio.Lock()
        self.autoscaling = PoolAutoscaling(cfg, run_dir, self.pool_sizes, self._resize)
        try:
            # Every pool's workers start at once: their constructors (an engine, a model) overlap.
            created = {row.name: self.pools[row.name].start(row.replicas) for row in rows}
            self.controller = _named_controller(cfg.name)
            infos = {name: [a.info.remote() for a in actors.values()] for name, actors in created.items()}
            for name, actors in created.items():
                self.infos[name] = dict(zip(actors, ray.get(infos[name], timeout=STARTUP_TIMEOUT_S)))
            ray.get(self.controller.report_sizes.remote(self.pool_sizes()), timeout=STARTUP_TIMEOUT_S)
            self.autoscaling.started({name: pool.spares_wanted for name, pool in self.pools.items()})
        except BaseException:
            self.shutdown()  # no worker outlives a failed start
            raise

    async def call(self, pool: str, method: str, *args):
        """One request to the least busy worker of `pool`; returns (worker name, result)."""
        return await self.pools[pool].call(method, *args)

    def restarts(self) -> int:
        """Workers replaced so far, over every pool."""
        return sum(pool.restarts for pool in self.pools.values())

    def pool_sizes(self) -> dict[str, int]:
        return {name: len(pool) for name, pool in self.pools.items()}

    def _on_restart(self, pool_name: str, dead: str, new: str, spare: bool) -> None:
        """Count a restart and keep the scrape targets current (the pool replaced the worker,
        with a warm spare or a new one)."""
        m.RESTARTS.labels(job=self.cfg.name, pool=pool_name, worker=dead).inc()
        asyncio.get_running_loop().create_task(self._register(pool_name))
        self.run_dir.event("worker_replaced", pool=pool_name, worker=dead, replacement=new, spare=spare)
        by = "the spare" if spare else "a new worker,"
        log.info(f"{pool_name} worker {dead} died; replaced by {by} {new} (restart {self.pools[pool_name].restarts})")

    async def _register(self, pool_name: str, lost_spare: str | None = None) -> None:
        """The pool's workers and spares, each with its info (its metrics endpoint), as scrape
        targets; a spare lost (dead or hung, made again behind) is a `spare_lost` row."""
        if lost_spare is not None:
            self.run_dir.event("spare_lost", pool=pool_name, worker=lost_spare)
            log.info(f"{pool_name} spare {lost_spare} was lost; another starts behind it")
        pool, infos = self.pools[pool_name], self.infos[pool_name]
        live = {**pool.actors, **pool.spares}
        for gone in set(infos) - set(live):
            infos.pop(gone)
        m.POOL_SPARES.labels(job=self.cfg.name, pool=pool_name, worker="driver").set(len(pool.spares))
        for name in set(live) - set(infos):
            try:
                infos[name] = await live[name].info.remote()
            except ray.exceptions.RayActorError:
                pass  # died meanwhile: its pool replaces it (a spare by its heartbeat), and this runs again
        self.write_scrape_targets()

    def write_scrape_targets(self) -> None:
        """Prometheus file-based service discovery, rewritten whenever workers come or go."""
        infos = {**self.other_targets(), **self.infos}
        groups = [
            {"targets": [i["metrics"]], "labels": {"job_name": self.cfg.name, "pool": pool, "worker": name}}
            for pool, items in infos.items()
            for name, i in items.items()
            if i.get("metrics")
        ]
        self.run_dir.write_json(RunDir.SCRAPE_TARGETS, groups)

    async def watch(self, version: Callable[[], int], on_spans: Callable[[list[dict]], None]) -> None:
        """Until cancelled: apply scale requests and the autoscaler's decisions, and heartbeat
        every pool's workers (a hung one is killed and replaced; the trace spans they answer with
        go to `on_spans`); a failure of any ends the job with its cause."""
        await asyncio.gather(
            self._watch_scaling(version),
            self.autoscaling.run(),
            *(pool.watch(self.cfg.faults, partial(self._on_hung, name), on_spans) for name, pool in self.pools.items()),
        )

    async def collect_spans(self) -> list[dict]:
        """One heartbeat round to every worker now: the trace spans recorded since the last one."""
        beats = await asyncio.gather(
            *(
                heartbeat(a, self.cfg.faults.heartbeat_timeout_s)
                for pool in self.pools.values()
                for a in pool.actors.values()
            )
        )
        return [span for beat in beats for span in beat.spans]

    def busy_shares(self, start: float, end: float) -> dict[str, float]:
        """`busy_<pool>`: the share of [start, end] (wall clock) each pool's workers had a request in
        flight; `queue_<pool>`: the mean samples waiting for a free worker of each scoring pool whose
        calls are joined, since the last step's (its queue depth)."""
        shares = self.activity.busy_shares(start, end, self.pool_sizes())
        return {**{f"busy_{pool}": share for pool, share in shares.items()}, **self.scoring.queue_depths()}

    def _on_hung(self, pool_name: str, dead: str, reason: str, detected_s: float, replaced_s: float) -> None:
        labels = {"job": self.cfg.name, "pool": pool_name, "worker": dead}
        m.HUNG_DETECTION_SECONDS.labels(**labels).observe(detected_s)
        m.WORKER_REPLACEMENT_SECONDS.labels(**labels).observe(replaced_s)
        self.run_dir.event(
            "worker_hung", pool=pool_name, worker=dead, reason=reason, detected_s=detected_s, replaced_s=replaced_s
        )
        log.info(
            f"{pool_name} worker {dead} was hung ({reason}): detected in {detected_s:.1f} s, "
            f"replaced in {replaced_s:.1f} s"
        )

    async def _watch_scaling(self, version: Callable[[], int]) -> None:
        """Apply scale requests from the JobController as they arrive. A size set by hand pins
        the pool (the autoscaler leaves it alone); a request without one (`--auto`) releases it."""
        controller = self.controller
        if controller is None:  # set by the constructor, which fails without it
            raise RuntimeError("the job's JobController is not started")
        while True:
            ticket, pool_name, replicas = await controller.next_request.remote()
            try:
                if pool_name not in self.pools:
                    raise KeyError(f"this job has no {pool_name} pool")
                changed: list[str] = []
                if replicas is None:
                    self.autoscaling.release(pool_name)
                else:
                    self.autoscaling.pin(pool_name)
                    changed = await self._resize(pool_name, replicas)
                outcome = {
                    "pool": pool_name,
                    "changed": changed,
                    "sizes": self.pool_sizes(),
                    "version": version(),
                    "auto": self.autoscaling.auto_pools(),
                    "managed": self.autoscaling.auto_pools(pinned_too=True),  # scaling.auto's, pinned or not
                }
            except (ValueError, KeyError) as exc:
                outcome = {"error": str(exc), "sizes": self.pool_sizes()}
            await controller.applied.remote(ticket, outcome)

    async def _resize(self, pool_name: str, replicas: int, source: str = "manual") -> list[str]:
        """Resize a pool (`source`: manual, a `scale` request, or auto, the autoscaler's); one
        resize at a time, the operator's and the autoscaler's."""
        if pool_name not in self.pools:
            raise KeyError(f"this job has no {pool_name} pool")
        pool = self.pools[pool_name]
        async with self._resizing:
            before = set(pool.actors)
            changed = await pool.resize(replicas)
            await self._register(pool_name)
            self.run_dir.event("scaled", pool=pool_name, replicas=len(pool), changed=changed, source=source)
            self.autoscaling.sized(pool_name, len(pool))
        sign = "+" if len(pool) > len(before) else "-"
        log.info(f"scaled {pool_name} pool to {len(pool)} ({sign}{', '.join(changed)})")
        return changed

    def shutdown(self) -> None:
        for pool in self.pools.values():
            pool.kill()
        if self.controller is not None:
            ray.kill(self.controller, no_restart=True)
