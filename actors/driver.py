"""The driver: a producer that runs ahead under admission control and a consumer that trains.

    producer: wait for admission -> prompts -> generation -> scoring -> advantages -> buffer
    consumer: buffer.take(min_version=step - max_staleness) -> learner.train -> publish version

Every task runs in one asyncio.TaskGroup: if any of them fails, the others are cancelled and the
job ends with that cause.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from tqdm import tqdm

from actors.generation import GenerationWorker
from actors.learner import LearnerRank
from actors.control import NAMESPACE, JobController, controller_name
from actors.learner import learner_placement_group, learner_rank_options
from actors.pools import ActorPool, actor_options
from actors.scoring import ReferenceWorker, RewardWorker
from rlhf_cluster.buffer import ExperienceBuffer
from rlhf_cluster.config import JobConfig
from rlhf_cluster.data.prompts import Prompt, PromptSource, prepare_prompt_files, read_prompt_file
from rlhf_cluster.experience import batch_advantages, build_group, group_rollouts, kl_controller
from rlhf_cluster import metrics as m
from rlhf_cluster.metrics import (
    BUFFER_DEPTH, BUFFER_DROPPED, CORRECTION_ESS, LEARNER_VERSION, STALENESS, TRAIN_CLIP, TRAIN_ENTROPY, TRAIN_KL,
    TRAIN_REWARD, MetricLabels, serve_metrics,
)
from rlhf_cluster.records import ScoredSample, TrainBatch
from rlhf_cluster.tiny_model import ensure_tiny_model


@dataclass
class ConsumedSample:
    """Provenance of a sample the learner trained on (for tests and audits)."""

    step: int
    sample_id: str
    policy_version: int
    worker: str


@dataclass
class JobResult:
    """What a finished job reports: per-step rows and every consumed sample."""

    rows: list[dict] = field(default_factory=list)
    consumed: list[ConsumedSample] = field(default_factory=list)
    final_version: int = 0
    run_dir: str = ""


def prepare_run_dir(cfg: JobConfig) -> Path:
    """A fresh run directory: artifacts of an earlier run of the same name are removed."""
    run_dir = Path(cfg.run_dir).expanduser()
    for stale in (cfg.weights_dir, run_dir / "metrics.jsonl", run_dir / "buffer.arrow"):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


class Driver:
    """Owns the pools, the buffer and the two loops of one job."""

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.run_dir = prepare_run_dir(cfg)
        self.model_path = str(cfg.model.path or ensure_tiny_model(cfg.model.tiny, cfg.model.cache_dir))
        train_file, _ = prepare_prompt_files(cfg.data, self.run_dir)
        prompts = read_prompt_file(train_file)
        self.source = PromptSource(prompts, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
        self.buffer = ExperienceBuffer(cfg.buffer.capacity)
        self.kl = kl_controller(cfg.algorithm.kl)
        self.zero_signal_dropped = 0
        self.labels = MetricLabels(job=cfg.name, pool="driver", worker="driver")
        self.metrics_port = serve_metrics(cfg.metrics.bind_address) if cfg.metrics.enabled else None
        self.published_version = 0
        self.groups_started = 0
        self.groups_dropped = 0
        self.worker_of: dict[str, str] = {}
        self.result = JobResult(run_dir=str(self.run_dir))
        self._changed = asyncio.Condition()
        self._start_pools()

    # ---- pools ---------------------------------------------------------------------------
    def _start_pools(self) -> None:
        cfg, cfg_dict = self.cfg, self.cfg.model_dump()
        gen_opts = actor_options(cfg.generation.resources)
        score_opts = actor_options(cfg.scoring.resources)
        world = cfg.learner.world_size
        # Learner ranks are gang-scheduled: all bundles are reserved before any rank starts.
        self.learner_group = learner_placement_group(cfg.learner.resources, world)
        self.ranks = [
            LearnerRank.options(**learner_rank_options(cfg.learner.resources, self.learner_group, r)).remote(
                cfg_dict, self.model_path, r, world
            )
            for r in range(world)
        ]
        addr, port = ray.get(self.ranks[0].address.remote())
        self.infos: dict[str, dict[str, dict]] = {"learner": {}}
        for info in ray.get([rank.setup.remote(addr, port) for rank in self.ranks]):
            self.infos["learner"][info["name"]] = info
        # Rank 0 publishes version 0 before any worker asks the store for weights.
        ray.get([rank.publish.remote(0) for rank in self.ranks])
        ray.get(self.ranks[0].wait_published.remote(0))
        faults = cfg.faults

        def pool(name: str, prefix: str, factory, prepare=None) -> ActorPool:
            return ActorPool(
                name, prefix, factory, prepare=prepare, max_restarts=faults.max_worker_restarts,
                backoff_s=faults.restart_backoff_s, on_restart=lambda dead, new: self._on_restart(name, dead, new),
            )

        async def load_newest_weights(actor) -> None:
            # A new generation worker loads the newest weights before it serves anything.
            await actor.sync.remote(self.published_version)

        self.pools: dict[str, ActorPool] = {
            "generation": pool(
                "generation", "gen", lambda i: GenerationWorker.options(**gen_opts).remote(cfg_dict, self.model_path, i),
                load_newest_weights,
            ),
            "reward": pool("reward", "reward", lambda i: RewardWorker.options(**score_opts).remote(cfg_dict, i)),
        }
        if cfg.scoring.reference:
            self.pools["reference"] = pool(
                "reference", "ref", lambda i: ReferenceWorker.options(**score_opts).remote(cfg_dict, self.model_path, i)
            )
        replicas = {
            "generation": cfg.generation.replicas,
            "reward": cfg.scoring.reward_replicas,
            "reference": cfg.scoring.reference_replicas,
        }
        for name, pool in self.pools.items():
            created = pool.start(replicas[name])
            self.infos[name] = dict(zip(created, ray.get([a.info.remote() for a in created.values()])))
        self._write_scrape_targets()
        self.controller = JobController.options(
            name=controller_name(cfg.name), namespace=NAMESPACE, get_if_exists=False
        ).remote()
        ray.get(self.controller.report_sizes.remote(self.pool_sizes()))

    def _on_restart(self, pool_name: str, dead: str, new: str) -> None:
        """Count a restart and keep the scrape targets current (the pool replaced the worker)."""
        m.RESTARTS.labels(job=self.cfg.name, pool=pool_name, worker=dead).inc()
        self.infos[pool_name].pop(dead, None)
        actor = self.pools[pool_name].actors[new]
        asyncio.get_running_loop().create_task(self._register(pool_name, new, actor))
        tqdm.write(f"{pool_name} worker {dead} died; replaced by {new} (restart {self.pools[pool_name].restarts})")

    async def _register(self, pool_name: str, name: str, actor) -> None:
        self.infos[pool_name][name] = await actor.info.remote()
        self._write_scrape_targets()

    def pool_sizes(self) -> dict[str, int]:
        return {name: len(pool) for name, pool in self.pools.items()}

    def _write_scrape_targets(self) -> None:
        """Prometheus file-based service discovery, rewritten whenever workers come or go."""
        groups = [
            {"targets": [i["metrics"]], "labels": {"job_name": self.cfg.name, "pool": pool, "worker": name}}
            for pool, items in self.infos.items()
            for name, i in items.items()
            if i.get("metrics")
        ]
        if self.metrics_port is not None:
            host = self.cfg.metrics.bind_address
            groups.append({"targets": [f"{host}:{self.metrics_port}"], "labels": {"job_name": self.cfg.name, "pool": "driver", "worker": "driver"}})
        path = self.run_dir / "prometheus_targets.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(groups, indent=1))
        tmp.replace(path)

    async def _watch_scaling(self) -> None:
        """Apply scale requests from the JobController as they arrive."""
        while True:
            ticket, pool_name, replicas = await self.controller.next_request.remote()
            try:
                changed = await self._resize(pool_name, replicas)
                outcome = {"pool": pool_name, "changed": changed, "sizes": self.pool_sizes(), "version": self.published_version}
            except (ValueError, KeyError) as exc:
                outcome = {"error": str(exc), "sizes": self.pool_sizes()}
            await self.controller.applied.remote(ticket, outcome)

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
        self._write_scrape_targets()
        tqdm.write(f"scaled {pool_name} pool to {len(pool)} ({'+' if len(pool) > len(before) else '-'}{', '.join(changed)})")
        return changed

    def shutdown(self) -> None:
        for pool in self.pools.values():
            pool.kill()
        for actor in [*self.ranks, self.controller]:
            ray.kill(actor, no_restart=True)
        ray.util.remove_placement_group(self.learner_group)

    # ---- producer ------------------------------------------------------------------------
    def _allowance(self) -> int:
        """Prompt groups that may start now (DESIGN: admission control)."""
        t = self.cfg.train
        limit = (self.published_version + t.max_staleness + 1) * t.prompts_per_step
        return limit - (self.groups_started - self.groups_dropped)

    async def _produce(self, tg: asyncio.TaskGroup) -> None:
        generation = self.pools["generation"]
        in_flight: set[asyncio.Task] = set()
        try:
            while True:
                async with self._changed:
                    # Two requests per generation worker keep each engine busy while one returns.
                    await self._changed.wait_for(lambda: self._allowance() > 0 and len(in_flight) < 2 * len(generation))
                    k = min(self.cfg.generation.prompts_per_request, self._allowance())
                    self.groups_started += k
                prompts = [self.source.next_prompt() for _ in range(k)]
                task = tg.create_task(self._process(prompts))
                in_flight.add(task)
                task.add_done_callback(lambda t: self._request_done(in_flight, t))
        finally:
            # The consumer is done (or the job failed): requests still running are not needed.
            for task in list(in_flight):
                task.cancel()

    def _request_done(self, in_flight: set, task: asyncio.Task) -> None:
        in_flight.discard(task)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _process(self, prompts: list[Prompt]) -> None:
        _, rollouts = await self.pools["generation"].call("generate", prompts, self.published_version)
        answers = {p.prompt_id: p.answer for p in prompts}
        scoring = [self.pools["reward"].call("score", rollouts, answers)]
        if "reference" in self.pools:
            scoring.append(self.pools["reference"].call("logprobs", rollouts))
        results = await asyncio.gather(*scoring)
        scores = results[0][1]
        refs = results[1][1] if len(results) > 1 else None
        by_index = {r.sample_id: i for i, r in enumerate(rollouts)}
        algo = self.cfg.algorithm
        async with self._changed:
            for group in group_rollouts(rollouts).values():
                idx = [by_index[r.sample_id] for r in group]
                samples, metrics = build_group(
                    group, [scores[i] for i in idx], [refs[i] for i in idx] if refs else None, algo,
                    kl_coef=self.kl.value, max_new_tokens=self.cfg.generation.sampling.max_new_tokens,
                )
                if algo.shaping.dynamic_sampling and metrics["zero_signal"]:
                    # No learning signal: drop it, count it, and let admission start another.
                    self.groups_dropped += 1
                    self.zero_signal_dropped += len(samples)
                    self.labels.of(BUFFER_DROPPED, reason="zero_signal").inc(len(samples))
                    continue
                self.buffer.add_group(samples)
                for r in group:
                    self.worker_of[r.sample_id] = r.worker
            self.labels.of(BUFFER_DEPTH).set(self.buffer.depth)
            self._changed.notify_all()

    # ---- consumer ------------------------------------------------------------------------
    async def _take(self, step: int) -> list[ScoredSample]:
        t = self.cfg.train
        async with self._changed:
            while True:
                before = self.buffer.dropped["stale"]
                samples = self.buffer.take(t.prompts_per_step, min_version=step - t.max_staleness)
                dropped = self.buffer.dropped["stale"] - before
                if dropped:
                    # Dropped groups free admission so the producer regenerates them.
                    self.groups_dropped += dropped // self.cfg.generation.sampling.n
                    self.labels.of(BUFFER_DROPPED, reason="stale").inc(dropped)
                    self._changed.notify_all()
                if samples is not None:
                    self.labels.of(BUFFER_DEPTH).set(self.buffer.depth)
                    return samples
                await self._changed.wait()

    async def _publish_done(self, version: int) -> None:
        await self.ranks[0].wait_published.remote(version)
        async with self._changed:
            self.published_version = max(self.published_version, version)
            self.labels.of(LEARNER_VERSION).set(self.published_version)
            self._changed.notify_all()

    async def _consume(self, tg: asyncio.TaskGroup, background: list[asyncio.Task]) -> None:
        cfg = self.cfg
        world = cfg.learner.world_size
        metrics_file = open(self.run_dir / "metrics.jsonl", "a")
        bar = tqdm(total=cfg.train.total_steps, desc="train", disable=not cfg.train.progress, dynamic_ncols=True)
        last = time.perf_counter()
        try:
            for step in range(cfg.train.total_steps):
                samples = await self._take(step)
                staleness = [step - s.policy_version for s in samples]
                for lag in staleness:
                    self.labels.of(STALENESS).observe(lag)
                self.labels.of(m.STALENESS_MAX).set(max(staleness))
                self.labels.of(m.STALENESS_BOUND).set(cfg.train.max_staleness)
                kl_coef = self.kl.value
                batch_metrics = batch_advantages(samples, cfg.algorithm, kl_coef)
                in_loss = [not (cfg.algorithm.shaping.overlong_filter and s.finish_reason == "length") for s in samples]
                batches = [TrainBatch.from_samples(samples[r::world], in_loss=in_loss[r::world]) for r in range(world)]
                stats = (await asyncio.gather(
                    *[rank.train.remote(batch, step + 1, kl_coef) for rank, batch in zip(self.ranks, batches)]
                ))[0]
                stats.update({f"advantage/{k}": v for k, v in batch_metrics.items()})
                stats["kl_coef"] = kl_coef
                stats["samples_in_loss"] = sum(in_loss)
                # The controller steers per-sequence KL (summed over tokens), as in Ziegler et al.
                mean_len = statistics.fmean(len(s.response_ids) for s in samples)
                self.kl.update(stats["policy/kl"] * mean_len, len(samples))
                tg.create_task(self._publish_done(step + 1))
                for s in samples:
                    self.result.consumed.append(ConsumedSample(step, s.sample_id, s.policy_version, self.worker_of.pop(s.sample_id)))
                now = time.perf_counter()
                row = self._row(step, samples, staleness, stats, now - last)
                last = now
                self.result.rows.append(row)
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                bar.update(1)
                bar.write(
                    f"step {row['step']:4d} | version {row['weight_version']:4d} | reward {row['reward_mean']:+.3f} | "
                    f"kl {row['kl']:.5f} | staleness {row['staleness_mean']:.2f} (max {row['staleness_max']}) | "
                    f"step {row['step_seconds']:.2f}s"
                )
        finally:
            bar.close()
            metrics_file.close()
            for task in background:
                task.cancel()
        # Scored samples not yet trained on are kept, in the buffer's on-disk (Arrow) format.
        self.buffer.save(self.run_dir / "buffer.arrow")

    def _row(self, step: int, samples: list[ScoredSample], staleness: list[int], stats: dict, seconds: float) -> dict:
        rewards = [s.reward for s in samples]
        row = {
            "step": step,
            "weight_version": step + 1,
            "reward_mean": statistics.fmean(rewards),
            "reward_std": statistics.pstdev(rewards),
            "kl": stats["policy/kl"],
            "staleness_mean": statistics.fmean(staleness),
            "staleness_max": max(staleness),
            "step_seconds": seconds,
            "learner_seconds": stats["learner/step_seconds"],
            "samples": len(samples),
            "response_len_mean": statistics.fmean(len(s.response_ids) for s in samples),
            "buffer_depth": self.buffer.depth,
            "dropped_stale": self.buffer.dropped["stale"],
            "dropped_zero_signal": self.zero_signal_dropped,
            "worker_restarts": sum(p.restarts for p in self.pools.values()),
            "time": time.time(),
        }
        row.update({k: v for k, v in stats.items() if k not in row})
        self.labels.of(TRAIN_KL).set(row["kl"])
        self.labels.of(TRAIN_REWARD).set(row["reward_mean"])
        self.labels.of(TRAIN_ENTROPY).set(stats.get("policy/entropy", 0.0))
        self.labels.of(TRAIN_CLIP).set(stats.get("policy/clip_frac", 0.0))
        self.labels.of(CORRECTION_ESS).set(stats.get("correction/ess", 1.0))
        return row

    # ---- the job -------------------------------------------------------------------------
    async def run(self) -> JobResult:
        """Run both loops to the last step; the first failure of any task ends the job with its cause."""
        try:
            async with asyncio.TaskGroup() as tg:
                producer = tg.create_task(self._produce(tg))
                watcher = tg.create_task(self._watch_scaling())
                tg.create_task(self._consume(tg, [producer, watcher]))
        except BaseExceptionGroup as group:
            # Surface the first real cause rather than an ExceptionGroup wrapper.
            first = group.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from group
        self.result.final_version = self.published_version
        return self.result


def run_job(cfg: JobConfig) -> JobResult:
    """Run one job on the connected Ray cluster (the caller has called `ray.init`)."""
    driver = Driver(cfg)
    try:
        return asyncio.run(driver.run())
    finally:
        driver.shutdown()
