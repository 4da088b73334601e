"""The job's worker pools (generation, reward, reference, judge), its scaling controller and the
Prometheus scrape targets of every actor it runs."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.workers._common import heartbeat
from actors.workers.control import NAMESPACE, JobController, controller_name
from actors.workers.generation import GenerationWorker
from actors.workers.judge import JudgeWorker
from actors.workers.pools import STARTUP_TIMEOUT_S, ActorPool, actor_options
from actors.workers.scoring import ReferenceWorker, RewardWorker
from actors.workers.settings import GenerationSettings, JudgeSettings, ScoringSettings
from actors.workers.weight_sync import WeightSync
from rlhf_cluster.config import JobConfig
from rlhf_cluster.models.quantization import int8_copy, write_int8_model_dir
from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.scoring.call_coalescing import CallCoalescer
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


def judge_model_path(cfg: JobConfig, run_dir: RunDir) -> str:
    """What judge engines start from: the judge's folder, or its int8 copy (written once)."""
    judge = cfg.scoring.judge_source
    assert judge is not None
    if judge.quantization != "int8":
        return judge.model
    import torch

    return str(int8_copy(judge.model, getattr(torch, cfg.engine_dtype), run_dir / RunDir.JUDGE_INT8))


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
    """Starts, resizes, replaces and ends the job's worker pools, and keeps the scrape targets
    current. A new generation worker joins through `weights` (the job's `WeightSync`, which
    pushes every version to the generation pool); `other_targets()` adds the rank groups' and the
    driver's endpoints to the scrape targets."""

    def __init__(
        self,
        cfg: JobConfig,
        run_dir: RunDir,
        model_path: str,
        engine_paths: dict[str, str],
        other_targets: Callable[[], dict[str, dict[str, dict]]],
        weights: WeightSync,
    ):
        self.cfg, self.run_dir = cfg, run_dir
        self.other_targets = other_targets
        self.infos: dict[str, dict[str, dict]] = {}
        self.controller = None
        self.activity = PoolActivity()  # every pool's requests in flight, for each step's busy share
        gen_opts, score_opts = actor_options(cfg.generation.resources), actor_options(cfg.scoring.resources)

        def pool(name: str, prefix: str, factory, prepare=None) -> ActorPool:
            return ActorPool(
                name,
                prefix,
                factory,
                prepare=prepare,
                max_restarts=cfg.faults.max_worker_restarts,
                backoff_s=cfg.faults.restart_backoff_s,
                activity=self.activity,
                on_restart=lambda dead, new: self._on_restart(name, dead, new),
            )

        # Each worker gets its section and the few job values it needs (`settings`), never the whole job.
        generation, scoring = GenerationSettings.of(cfg), ScoringSettings.of(cfg)
        # `.options`: @ray.remote made each worker class an ActorClass, which mypy (ignoring class decorators)
        # cannot see.
        self.pools: dict[str, ActorPool] = {
            "generation": pool(
                "generation",
                "gen",
                lambda i, slot: GenerationWorker.options(**gen_opts).remote(  # type: ignore[attr-defined]  # ActorClass
                    generation,
                    engine_paths["int8" if cfg.generation.quantization_of(slot) == "int8" else "full"],
                    i,
                    slot,
                ),
                weights.join,  # a new worker loads the newest version before it serves
            ),
            "reward": pool(
                "reward",
                "reward",
                lambda i, _slot: RewardWorker.options(**score_opts).remote(  # type: ignore[attr-defined]  # ActorClass
                    scoring, i
                ),
            ),
        }
        # With LoRA the learner's base model (adapters off) is the reference: no copy to run. With
        # distillation the reference workers serve the teacher (preflight refuses it beside LoRA).
        distillation = cfg.algorithm.distillation
        reference_path = model_path if distillation is None else distillation.teacher
        if cfg.scoring.reference and not cfg.learner.lora.enabled:
            self.pools["reference"] = pool(
                "reference",
                "ref",
                lambda i, _slot: ReferenceWorker.options(  # type: ignore[attr-defined]  # ActorClass
                    **score_opts
                ).remote(scoring, reference_path, i),
            )
        judge = cfg.scoring.judge_source
        if judge is not None:  # a judge model's verdicts as a reward: its own pool, scaled like the others
            judge_settings, judge_path = JudgeSettings.of(cfg), judge_model_path(cfg, run_dir)
            self.pools["judge"] = pool(
                "judge",
                "judge",
                lambda i, _slot: JudgeWorker.options(**score_opts).remote(  # type: ignore[attr-defined]  # ActorClass
                    judge_settings, judge_path, i
                ),
            )
        weights.serve(self.pools["generation"])
        # Scoring calls of groups that finish together leave as one call per free worker, a step's samples at most.
        self._rewards = CallCoalescer(self._send_rewards, lambda: len(self.pools["reward"]), cfg.samples_per_step)
        self._references = CallCoalescer(
            self._send_references, lambda: len(self.pools["reference"]), cfg.samples_per_step
        )
        # Calls are joined, never split: a group judge gets each group whole.
        self._judged = CallCoalescer(self._send_judge, lambda: len(self.pools["judge"]), cfg.samples_per_step)
        replicas = {
            "generation": cfg.generation.replicas,
            "reward": cfg.scoring.reward_replicas,
            "reference": cfg.scoring.reference_replicas,
            "judge": cfg.scoring.judge_replicas,
        }
        try:
            # Every pool's workers start at once: their constructors (an engine, a model) overlap.
            created = {name: p.start(replicas[name]) for name, p in self.pools.items()}
            self.controller = _named_controller(cfg.name)
            infos = {name: [a.info.remote() for a in actors.values()] for name, actors in created.items()}
            for name, actors in created.items():
                self.infos[name] = dict(zip(actors, ray.get(infos[name], timeout=STARTUP_TIMEOUT_S)))
            ray.get(self.controller.report_sizes.remote(self.pool_sizes()), timeout=STARTUP_TIMEOUT_S)
        except BaseException:
            self.shutdown()  # no worker outlives a failed start
            raise

    async def call(self, pool: str, method: str, *args):
        """One request to the least busy worker of `pool`; returns (worker name, result)."""
        return await self.pools[pool].call(method, *args)

    async def score(self, rollouts: list, answers: dict[str, str]) -> list[tuple[float, dict[str, float]]]:
        """(reward, components) per rollout, from the reward pool; joined with other groups' calls
        that wait for a free reward worker."""
        return await self._rewards([(r, answers) for r in rollouts])

    async def reference_logprobs(self, rollouts: list) -> list[list[float]] | None:
        """Per-token reference log-probs per rollout (None: the job runs no reference pool); joined
        with other groups' calls that wait for a free reference worker."""
        return await self._references(rollouts) if "reference" in self.pools else None

    async def judge(self, rollouts: list, prompts: dict[str, str], answers: dict[str, str]) -> list | None:
        """The judge's reward per rollout (None for one it could not judge), or None when the job
        has no judge; joined with other groups' calls that wait for a free judge worker (a group's
        rollouts stay in one call)."""
        if "judge" not in self.pools:
            return None
        return await self._judged([(r, prompts[r.prompt_id], answers[r.prompt_id]) for r in rollouts])

    async def _send_judge(self, items: list[tuple]) -> list:
        return (await self.call("judge", "judge", items))[1]

    async def _send_rewards(self, items: list[tuple]) -> list:
        answers: dict[str, str] = {}
        for held in {id(a): a for _, a in items}.values():
            answers.update(held)
        return (await self.call("reward", "score", [r for r, _ in items], answers))[1]

    async def _send_references(self, rollouts: list) -> list:
        return (await self.call("reference", "logprobs", rollouts))[1]

    def restarts(self) -> int:
        """Workers replaced so far, over every pool."""
        return sum(pool.restarts for pool in self.pools.values())

    def pool_sizes(self) -> dict[str, int]:
        return {name: len(pool) for name, pool in self.pools.items()}

    def _on_restart(self, pool_name: str, dead: str, new: str) -> None:
        """Count a restart and keep the scrape targets current (the pool replaced the worker)."""
        m.RESTARTS.labels(job=self.cfg.name, pool=pool_name, worker=dead).inc()
        self.infos[pool_name].pop(dead, None)
        actor = self.pools[pool_name].actors[new]
        asyncio.get_running_loop().create_task(self._register(pool_name, new, actor))
        self.run_dir.event("worker_replaced", pool=pool_name, worker=dead, replacement=new)
        log.info(f"{pool_name} worker {dead} died; replaced by {new} (restart {self.pools[pool_name].restarts})")

    async def _register(self, pool_name: str, name: str, actor) -> None:
        self.infos[pool_name][name] = await actor.info.remote()
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
        """Until cancelled: apply scale requests, and heartbeat every pool's workers (a hung one is
        killed and replaced; the trace spans they answer with go to `on_spans`); a failure of
        either ends the job with its cause."""
        await asyncio.gather(
            self._watch_scaling(version),
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
        """`busy_<pool>`: the share of [start, end] (wall clock) each pool's workers had a request in flight."""
        shares = self.activity.busy_shares(start, end, self.pool_sizes())
        return {f"busy_{pool}": share for pool, share in shares.items()}

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
        """Apply scale requests from the JobController as they arrive."""
        controller = self.controller
        if controller is None:  # set by the constructor, which fails without it
            raise RuntimeError("the job's JobController is not started")
        while True:
            ticket, pool_name, replicas = await controller.next_request.remote()
            try:
                changed = await self._resize(pool_name, replicas)
                outcome = {"pool": pool_name, "changed": changed, "sizes": self.pool_sizes(), "version": version()}
            except (ValueError, KeyError) as exc:
                outcome = {"error": str(exc), "sizes": self.pool_sizes()}
            await controller.applied.remote(ticket, outcome)

    async def _resize(self, pool_name: str, replicas: int) -> list[str]:
        if pool_name not in self.pools:
            raise KeyError(f"this job has no {pool_name} pool")
        pool = self.pools[pool_name]
        before = set(pool.actors)
        changed = await pool.resize(replicas)
        for name in changed:
            if name in before:
                self.infos[pool_name].pop(name, None)
            else:
                self.infos[pool_name][name] = await pool.actors[name].info.remote()
        self.write_scrape_targets()
        self.run_dir.event("scaled", pool=pool_name, replicas=len(pool), changed=changed)
        log.info(
            f"scaled {pool_name} pool to {len(pool)} ({'+' if len(pool) > len(before) else '-'}{', '.join(changed)})"
        )
        return changed

    def shutdown(self) -> None:
        for pool in self.pools.values():
            pool.kill()
        if self.controller is not None:
            ray.kill(self.controller, no_restart=True)
