"""The driver: a producer that runs ahead under admission control and a consumer that trains.

    producer: wait for admission -> prompts -> generation -> scoring -> advantages -> buffer
    consumer: buffer.take(min_version=step - max_staleness) -> learner.train -> publish version

In `generation.mode: streaming` every admitted prompt is its own request: its group goes to
scoring the moment its last response finishes, and each published version is pushed to the
generation workers, which load it while responses are in flight.

Every task runs in one asyncio.TaskGroup: if any of them fails, the others are cancelled and the
job ends with that cause.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import ray
from tqdm import tqdm

from actors.control import NAMESPACE, JobController, controller_name
from actors.critic import CriticGroup
from actors.generation import GenerationWorker
from actors.learner import LearnerGroup
from actors.pools import ActorPool, actor_options
from actors.scoring import ReferenceWorker, RewardWorker
from rlhf_cluster.buffer import ExperienceBuffer
from rlhf_cluster.checkpoint import Checkpoint, CheckpointError, CheckpointStore
from rlhf_cluster.config import JobConfig
from rlhf_cluster.data.prompts import Prompt, PromptSource, prepare_prompt_files, read_prompt_file
from rlhf_cluster.experience import batch_advantages, build_group, critic_advantages, group_rollouts, kl_controller
from rlhf_cluster.fileio import write_atomic
from rlhf_cluster.generation.probe import MismatchAlarm, Probe, build_probe
from rlhf_cluster.generation.quantization import write_int8_model_dir
from rlhf_cluster import metrics as m
from rlhf_cluster.metrics import MetricLabels, serve_metrics
from rlhf_cluster.records import ScoredSample, TrainBatch
from rlhf_cluster.scoring.rewards import load_reward_fn
from rlhf_cluster.tiny_model import ensure_tiny_model
from rlhf_cluster.validation import validate_model_dir, validate_reward_model_dir
from rlhf_cluster.warmup import ensure_warmed_model
from rlhf_cluster.weights import WeightStore

log = logging.getLogger(__name__)
ENGINE_INT8_DIR = "engine-int8"  # the int8 checkpoint generation engines start from (under run_dir)
TIMELINE_FILE = "rollout_timeline.jsonl"  # per prompt group: when it was requested, generated, buffered
CRITIC_DIR = "critic"  # the critic's learner checkpoint inside a job checkpoint


@dataclass
class ConsumedSample:
    """Provenance of a sample the learner trained on (for tests and audits)."""

    step: int
    sample_id: str
    prompt_id: str
    policy_version: int
    worker: str
    policy_versions: list = field(default_factory=list)  # (first token, version) spans of the response


@dataclass
class JobResult:
    """What a finished job reports: per-step rows and every consumed sample."""

    rows: list[dict] = field(default_factory=list)
    consumed: list[ConsumedSample] = field(default_factory=list)
    final_version: int = 0
    accuracy_before: float | None = None  # held-out accuracy (greedy, verifier) before training
    accuracy_after: float | None = None
    sampled_accuracy_before: float | None = None  # mean verifier correctness of data.eval_samples samples per prompt
    sampled_accuracy_after: float | None = None
    run_dir: str = ""


def prepare_run_dir(cfg: JobConfig, fresh: bool) -> Path:
    """The run directory; for a fresh (not resumed) run, an earlier run's artifacts are removed."""
    run_dir = Path(cfg.run_dir).expanduser()
    stale_paths = (cfg.weights_dir, cfg.checkpoint_dir, run_dir / "metrics.jsonl", run_dir / "consumed.jsonl",
                   run_dir / "probes.jsonl", run_dir / "buffer.arrow", run_dir / "resume.json", run_dir / ENGINE_INT8_DIR,
                   run_dir / TIMELINE_FILE)
    for stale in stale_paths if fresh else ():
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def build_job_probe(cfg: JobConfig, model_path: str, prompts: list[Prompt]) -> Probe | None:
    """The job's mismatch probe (None when `generation.probe.sequences` is 0)."""
    if cfg.generation.probe.sequences == 0:
        return None
    from transformers import AutoTokenizer

    return build_probe(prompts, AutoTokenizer.from_pretrained(model_path), cfg.generation.probe.sequences)


def _warmup_progress(steps: int, show: bool):
    bar = tqdm(total=steps, desc="supervised warm-up", disable=not show, dynamic_ncols=True)

    def update(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if step + 1 == steps:
            bar.close()

    return update


class Driver:
    """Owns the pools, the buffer and the two loops of one job."""

    def __init__(self, cfg: JobConfig, resume: str | None = None):
        self.cfg = cfg
        self.checkpoints = CheckpointStore(cfg.checkpoint_dir, cfg.checkpoint.keep)
        resume_from = self._checkpoint_to_resume(resume)
        self.run_dir = prepare_run_dir(cfg, fresh=resume_from is None)
        # Bad input fails here, before any actor starts.
        if cfg.model.path is not None:
            validate_model_dir(cfg.model.path)
        if cfg.data.reward_fn is not None:
            load_reward_fn(cfg.data.reward_fn)
        for spec in cfg.scoring.reward_models:
            validate_reward_model_dir(spec.path)
        if self.uses_critic and cfg.critic.init != "policy":
            validate_reward_model_dir(cfg.critic.init, field="critic.init")
        self.model_path = str(cfg.model.path or ensure_tiny_model(cfg.model.tiny, cfg.model.cache_dir))
        train_file, eval_file = prepare_prompt_files(cfg.data, self.run_dir)
        self.prompts = read_prompt_file(train_file)
        self.eval_prompts = read_prompt_file(eval_file) if eval_file is not None else []
        if cfg.model.warmup_steps:
            # The warmed-up model is version 0: the reference, the learner and generation all start there.
            self.model_path = str(ensure_warmed_model(
                self.model_path, self.prompts, cfg.model.warmup_steps, cfg.model.warmup_lr, cfg.model.warmup_batch_size,
                cfg.seed, progress=_warmup_progress(cfg.model.warmup_steps, cfg.train.progress),
            ))
        for warning in cfg.warnings():
            log.warning(warning)
        self.probe = build_job_probe(cfg, self.model_path, self.prompts)
        self.mismatch_alarm = MismatchAlarm(cfg.generation.probe.alert_factor, cfg.generation.probe.alert_floor)
        self.labels = MetricLabels(job=cfg.name, pool="driver", worker="driver")
        self.labels.of(m.MISMATCH_ALERTS)  # exported at 0 from the start, so dashboards and rate() see it
        self.metrics_port = serve_metrics(cfg.metrics.bind_address) if cfg.metrics.enabled else None
        self.store = WeightStore(cfg.weights_dir, cfg.weights.keep)
        self.worker_of: dict[str, str] = {}
        self.result = JobResult(run_dir=str(self.run_dir))
        self.learner_restarts = 0
        self.bad_steps = 0
        self.timeline = 0  # bumped by every rollback: late results of an abandoned timeline are ignored
        self._changed = asyncio.Condition()
        self._checkpointing: asyncio.Task | None = None
        self._producer: asyncio.Task | None = None
        self.stop_requested = False
        self.cfg_dict = cfg.model_dump()
        self.infos: dict[str, dict[str, dict]] = {}
        try:
            self._start_learner()
            self._restore(resume_from)
            self._start_workers()
        except BaseException:
            self.shutdown()  # no actor outlives a failed start
            raise

    @property
    def uses_critic(self) -> bool:
        """PPO with a learned critic: a critic group runs beside the learner."""
        return self.cfg.algorithm.advantage == "gae"

    def _checkpoint_to_resume(self, resume: str | None) -> Checkpoint | None:
        """`auto`: the newest checkpoint that verifies (None if there is none); a path: exactly that one."""
        if resume is None:
            return None
        if resume == "auto":
            return self.checkpoints.latest(on_refused=lambda exc: tqdm.write(f"refusing {exc}"))
        return CheckpointStore.verify(resume)

    # ---- state that checkpoints capture ---------------------------------------------------
    def _reset_state(self) -> None:
        self.source = PromptSource(self.prompts, seed=self.cfg.data.seed, shuffle=self.cfg.data.shuffle)
        self.pending_prompts: deque[Prompt] = deque()
        self.in_flight_prompts: dict[int, list[Prompt]] = {}
        self.buffer = ExperienceBuffer(self.cfg.buffer.capacity)
        self.kl = kl_controller(self.cfg.algorithm.kl)
        self.zero_signal_dropped = 0
        self.groups_started = 0
        self.groups_dropped = 0
        self.start_step = 0

    def _snapshot(self, step: int, directory: Path) -> None:
        """Write the driver's half of a checkpoint after `step`: state JSON and the buffer."""
        pending = list(self.pending_prompts) + [p for ps in self.in_flight_prompts.values() for p in ps]
        state = {
            "step": step,
            "version": step + 1,
            "kl": self.kl.state_dict(),
            "source": self.source.state_dict(),
            # Prompts taken from the source but not yet in the buffer: generated again on resume.
            "pending_prompts": [[p.prompt_id, p.text, p.answer] for p in pending],
            "zero_signal_dropped": self.zero_signal_dropped,
            "dropped": dict(self.buffer.dropped),
        }
        (directory / "driver.json").write_text(json.dumps(state))
        self.buffer.save(directory / "buffer.arrow")

    def _restore(self, ckpt: Checkpoint | None) -> None:
        """Put learner, weight store and driver state where `ckpt` left them (or at the start)."""
        self._reset_state()
        if ckpt is None:
            self.store.discard_from(0)
            self.learner.publish_now(0)
            self.published_version = 0
            self._truncate_logs(-1)
            return
        digests = self.learner.load_checkpoint(str(ckpt.path))
        if digests != ckpt.manifest["rank_digests"]:
            raise CheckpointError(f"checkpoint {ckpt.path}: restored learner state differs from the saved state")
        if self.critic is not None:
            if "critic_rank_digests" not in ckpt.manifest:
                raise CheckpointError(f"checkpoint {ckpt.path}: has no critic state (written by a job without a critic)")
            if self.critic.load_checkpoint(str(ckpt.path / CRITIC_DIR)) != ckpt.manifest["critic_rank_digests"]:
                raise CheckpointError(f"checkpoint {ckpt.path}: restored critic state differs from the saved state")
        state = ckpt.driver_state()
        self.source.load_state_dict(state["source"])
        self.pending_prompts.extend(Prompt(*p) for p in state["pending_prompts"])
        self.buffer.load(ckpt.path / "buffer.arrow")
        self.buffer.dropped.update(state["dropped"])
        self.kl.load_state_dict(state["kl"])
        self.zero_signal_dropped = state["zero_signal_dropped"]
        self.start_step = ckpt.step + 1
        self.groups_started = self.start_step * self.cfg.train.prompts_per_step + self.buffer.ready_groups()
        # Versions after the checkpoint belong to the abandoned run; the checkpoint's is republished.
        self.store.discard_from(ckpt.version)
        self.learner.publish_now(ckpt.version)
        self.published_version = ckpt.version
        self._truncate_logs(ckpt.step)
        resume = {"step": ckpt.step, "version": ckpt.version, "path": str(ckpt.path), "rank_digests": digests}
        (self.run_dir / "resume.json").write_text(json.dumps(resume))
        tqdm.write(f"resumed from {ckpt.path}: next step {self.start_step}, weight version {ckpt.version}")

    def _truncate_logs(self, last_step: int) -> None:
        """Keep the JSONL rows of steps <= last_step, so a resumed run's metrics continue the original's."""
        for name in ("metrics.jsonl", "consumed.jsonl"):
            path = self.run_dir / name
            rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
            write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= last_step))
        self.result.rows = [r for r in self.result.rows if r["step"] <= last_step]
        self.result.consumed = [c for c in self.result.consumed if c.step <= last_step]

    # ---- pools ---------------------------------------------------------------------------
    def _start_learner(self) -> None:
        cfg = self.cfg
        self.learner = LearnerGroup(self.cfg_dict, self.model_path, cfg.learner.resources, cfg.learner.world_size, self.probe)
        self.infos["learner"] = self.learner.infos
        self.critic: CriticGroup | None = None
        if self.uses_critic:
            self.critic = CriticGroup(self.cfg_dict, self.model_path, cfg.critic.resources, cfg.critic.world_size)
            self.infos["critic"] = self.critic.infos

    def _start_workers(self) -> None:
        cfg, cfg_dict = self.cfg, self.cfg_dict
        gen_opts = actor_options(cfg.generation.resources)
        score_opts = actor_options(cfg.scoring.resources)
        faults = cfg.faults

        def pool(name: str, prefix: str, factory, prepare=None) -> ActorPool:
            return ActorPool(
                name, prefix, factory, prepare=prepare, max_restarts=faults.max_worker_restarts,
                backoff_s=faults.restart_backoff_s, on_restart=lambda dead, new: self._on_restart(name, dead, new),
            )

        async def load_newest_weights(actor) -> None:
            # A new generation worker loads the newest weights before it serves anything.
            await actor.sync.remote(self.published_version)

        engine_path = self._engine_model_path()
        self.pools: dict[str, ActorPool] = {
            "generation": pool(
                "generation", "gen", lambda i: GenerationWorker.options(**gen_opts).remote(cfg_dict, engine_path, i),
                load_newest_weights,
            ),
            "reward": pool("reward", "reward", lambda i: RewardWorker.options(**score_opts).remote(cfg_dict, i)),
        }
        # With LoRA the learner's base model (adapters off) is the reference: no copy to run.
        if cfg.scoring.reference and not cfg.learner.lora.enabled:
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

    def _engine_model_path(self) -> str:
        """What generation engines start from: the model folder, or with int8 rollouts an int8
        checkpoint of the published version's int8 variant (written once; workers then sync)."""
        if self.cfg.generation.quantization != "int8":
            return self.model_path
        quantized = self.store.load(self.published_version, variant="int8")
        return str(write_int8_model_dir(self.model_path, quantized, self.run_dir / ENGINE_INT8_DIR))

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
        write_atomic(self.run_dir / "prometheus_targets.json", json.dumps(groups, indent=1))

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
        for pool in getattr(self, "pools", {}).values():
            pool.kill()
        if hasattr(self, "controller"):
            ray.kill(self.controller, no_restart=True)
        if hasattr(self, "learner"):
            self.learner.kill()
        if getattr(self, "critic", None) is not None:
            self.critic.kill()

    # ---- producer ------------------------------------------------------------------------
    def _allowance(self) -> int:
        """Prompt groups that may start now (DESIGN: admission control)."""
        t = self.cfg.train
        limit = (self.published_version + t.max_staleness + 1) * t.prompts_per_step + t.oversample_groups
        return limit - (self.groups_started - self.groups_dropped)

    def _next_prompt(self) -> Prompt:
        return self.pending_prompts.popleft() if self.pending_prompts else self.source.next_prompt()

    def _requests_per_worker(self) -> int:
        """Requests the producer keeps in flight per generation worker."""
        g = self.cfg.generation
        if g.mode == "streaming":
            # One group per request: enough to fill the engine's batch (admission bounds the total).
            return max(1, g.max_num_seqs // g.sampling.n)
        return 2  # batched: one request decodes while the other returns

    async def _produce(self, tg: asyncio.TaskGroup) -> None:
        generation = self.pools["generation"]
        in_flight: set[asyncio.Task] = set()
        per_request = self.cfg.generation.prompts_per_request if self.cfg.generation.mode == "batched" else 1
        try:
            while True:
                async with self._changed:
                    await self._changed.wait_for(
                        lambda: self._allowance() > 0 and len(in_flight) < self._requests_per_worker() * len(generation)
                    )
                    k = min(per_request, self._allowance())
                    self.groups_started += k
                prompts = [self._next_prompt() for _ in range(k)]
                key = id(prompts)
                self.in_flight_prompts[key] = prompts
                task = tg.create_task(self._process(prompts, key, self.timeline))
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

    async def _process(self, prompts: list[Prompt], key: int, timeline: int) -> None:
        requested_at = time.time()
        if self.cfg.generation.mode == "streaming":
            call = ("generate_group", prompts[0], self.published_version)
        else:
            call = ("generate", prompts, self.published_version)
        _, (rollouts, probe_reports) = await self.pools["generation"].call(*call)
        generated_at = time.time()  # handed to scoring now
        self._record_probes(probe_reports)
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
            if timeline != self.timeline:
                return  # generated for a timeline a rollback abandoned
            self.in_flight_prompts.pop(key)
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
                    self.labels.of(m.BUFFER_DROPPED, reason="zero_signal").inc(len(samples))
                    continue
                self.buffer.add_group(samples)
                for r in group:
                    self.worker_of[r.sample_id] = r.worker
                self._log_group(group, requested_at, generated_at)
            self.labels.of(m.BUFFER_DEPTH).set(self.buffer.depth)
            self._changed.notify_all()

    def _log_group(self, group: list, requested_at: float, generated_at: float) -> None:
        """One timeline row per buffered group: when it was requested, generated (and handed to
        scoring) and buffered, and the version spans of its responses."""
        row = {"group_id": group[0].group_id, "worker": group[0].worker, "requested_at": requested_at,
               "generated_at": generated_at, "buffered_at": time.time(),
               "policy_versions": [r.policy_versions for r in group]}
        with open(self.run_dir / TIMELINE_FILE, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def _record_probes(self, reports: list[dict]) -> None:
        """Log each worker's post-sync probe mismatch (probes.jsonl) and alert when it jumps."""
        for report in reports:
            report["alert"] = self.mismatch_alarm.observe(report["k3"])
            if report["alert"]:
                self.labels.of(m.MISMATCH_ALERTS).inc()
                log.warning(
                    "rollout mismatch jumped: %s version %d probe k3 %.3g (max |dlogp| %.3g), median so far %.3g",
                    report["worker"], report["version"], report["k3"], report["max_abs_diff"],
                    statistics.median(self.mismatch_alarm.history[:-1]),
                )
            with open(self.run_dir / "probes.jsonl", "a") as fh:
                fh.write(json.dumps(report) + "\n")

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
                    self.labels.of(m.BUFFER_DROPPED, reason="stale").inc(dropped)
                    self._changed.notify_all()
                if samples is not None:
                    self.labels.of(m.BUFFER_DEPTH).set(self.buffer.depth)
                    return samples
                await self._changed.wait()

    async def _publish_done(self, leader, version: int, timeline: int) -> None:
        try:
            await leader.wait_published.remote(version)
        except ray.exceptions.RayActorError:
            return  # the learner died; the consumer rolls back to the newest checkpoint
        async with self._changed:
            if timeline != self.timeline:
                return
            self.published_version = max(self.published_version, version)
            self.labels.of(m.LEARNER_VERSION).set(self.published_version)
            self._changed.notify_all()
        if self.cfg.generation.mode == "streaming":
            await self._push_newest_version()

    async def _push_newest_version(self) -> None:
        """Streaming: every generation worker loads the newest version now, with its requests in flight.

        A worker that dies meanwhile is the pool's business (it is replaced and its replacement
        loads the newest version before serving); any other failure ends the job.
        """
        actors = list(self.pools["generation"].actors.values())
        # min_version 0: after a rollback the version just published may be gone again; the
        # newest is what counts.
        results = await asyncio.gather(*[a.sync.remote(0) for a in actors], return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, ray.exceptions.RayActorError):
                raise result
        # The probe reports of these loads, now: the last version of a job is never generated with.
        reports = await asyncio.gather(*[a.take_probe_reports.remote() for a in actors], return_exceptions=True)
        self._record_probes([r for rs in reports if not isinstance(rs, BaseException) for r in rs])

    async def _train(self, step: int, samples: list[ScoredSample]) -> dict:
        """One learner step on all ranks; the result is published as version step + 1."""
        cfg, world = self.cfg, self.cfg.learner.world_size
        kl_coef = self.kl.value
        batch_metrics = batch_advantages(samples, cfg.algorithm, kl_coef)
        in_loss = [not (cfg.algorithm.shaping.overlong_filter and s.finish_reason == "length") for s in samples]
        critic_step = None
        if self.critic is not None:
            # PPO with a critic: the critic's values of this batch (before either model steps) give
            # the GAE advantages the policy trains on and the returns the critic regresses to.
            values = await self._critic_values(samples)
            returns, gae_metrics = critic_advantages(samples, values, cfg.algorithm, kl_coef)
            batch_metrics.update(gae_metrics)
            cw = self.critic.world_size
            critic_batches = [
                TrainBatch.from_samples(samples[r::cw], in_loss=in_loss[r::cw], returns=returns[r::cw], old_values=values[r::cw])
                for r in range(cw)
            ]
            critic_step = asyncio.gather(*[rank.train.remote(b) for rank, b in zip(self.critic.ranks, critic_batches)])
        batches = [TrainBatch.from_samples(samples[r::world], in_loss=in_loss[r::world]) for r in range(world)]
        policy_step = asyncio.gather(
            *[rank.train.remote(batch, step + 1, kl_coef) for rank, batch in zip(self.learner.ranks, batches)]
        )
        # The two groups train on the same batch at the same time.
        if critic_step is None:
            stats = (await policy_step)[0]
        else:
            policy_stats, critic_stats = await asyncio.gather(policy_step, critic_step)
            stats = {**policy_stats[0], **critic_stats[0]}
        stats.update({f"advantage/{k}": v for k, v in batch_metrics.items()})
        stats["kl_coef"] = kl_coef
        stats["samples_in_loss"] = sum(in_loss)
        return stats

    async def _critic_values(self, samples: list[ScoredSample]) -> list[list[float]]:
        """Per-token values of every sample (in order), each critic rank computing its round-robin share."""
        cw = self.critic.world_size
        shares = await asyncio.gather(
            *[rank.values.remote(TrainBatch.from_samples(samples[r::cw])) for r, rank in enumerate(self.critic.ranks)]
        )
        values: list[list[float]] = [[] for _ in samples]
        for r, share in enumerate(shares):
            for row, i in enumerate(range(r, len(samples), cw)):
                values[i] = share[row, : len(samples[i].response_ids)].tolist()
        return values

    async def _consume(self, tg: asyncio.TaskGroup, watcher: asyncio.Task) -> None:
        cfg = self.cfg
        total = cfg.train.total_steps
        bar = tqdm(total=total, initial=self.start_step, desc="train", disable=not cfg.train.progress, dynamic_ncols=True)
        last = time.perf_counter()
        step = self.start_step
        try:
            while step < total and not self.stop_requested:
                samples = await self._take(step)
                staleness = [step - s.policy_version for s in samples]
                for lag in staleness:
                    self.labels.of(m.STALENESS).observe(lag)
                self.labels.of(m.STALENESS_MAX).set(max(staleness))
                self.labels.of(m.STALENESS_BOUND).set(cfg.train.max_staleness)
                try:
                    stats = await self._train(step, samples)
                except ray.exceptions.RayActorError as exc:
                    step = await self._recover_learner(tg, exc)
                    bar.reset(total)
                    bar.update(step)
                    continue
                self._check_bad_step(step, stats)
                # The controller steers per-sequence KL (summed over tokens), as in Ziegler et al.
                mean_len = statistics.fmean(len(s.response_ids) for s in samples)
                self.kl.update(stats["policy/kl"] * mean_len, len(samples))
                tg.create_task(self._publish_done(self.learner.leader, step + 1, self.timeline))
                now = time.perf_counter()
                row = self._row(step, samples, staleness, stats, now - last)
                last = now
                self._log_step(row, [
                    ConsumedSample(step, s.sample_id, s.prompt_id, s.policy_version, self.worker_of.pop(s.sample_id, "?"),
                                   [list(span) for span in s.policy_versions])
                    for s in samples
                ])
                bar.update(1)
                bar.write(
                    f"step {row['step']:4d} | version {row['weight_version']:4d} | reward {row['reward_mean']:+.3f} | "
                    f"kl {row['kl']:.5f} | staleness {row['staleness_mean']:.2f} (max {row['staleness_max']}) | "
                    f"step {row['step_seconds']:.2f}s"
                )
                if (step + 1) % cfg.checkpoint.every_steps == 0 or step + 1 == total or self.stop_requested:
                    await self._checkpoint(tg, step)
                step += 1
            if self._checkpointing is not None:
                await self._checkpointing  # the final checkpoint is complete before the job reports done
        finally:
            bar.close()
            for task in (self._producer, watcher):
                task.cancel()
        # Scored samples not yet trained on are kept, in the buffer's on-disk (Arrow) format.
        self.buffer.save(self.run_dir / "buffer.arrow")

    async def evaluate(self, samples: int = 0) -> float | None:
        """Held-out accuracy of the newest published weights, judged by the verifier: of greedy
        answers, or with `samples` > 0 the mean over that many sampled answers per prompt."""
        if not self.eval_prompts:
            return None
        _, rollouts = await self.pools["generation"].call("evaluate", self.eval_prompts, self.published_version, samples)
        answers = {p.prompt_id: p.answer for p in self.eval_prompts}
        _, scores = await self.pools["reward"].call("score", rollouts, answers)
        return statistics.fmean(components.get("correct", 0.0) for _, components in scores)

    async def _evaluate_all(self) -> tuple[float | None, float | None]:
        """Greedy and (if `data.eval_samples`) sampled held-out accuracy."""
        greedy = await self.evaluate()
        samples = self.cfg.data.eval_samples
        return greedy, (await self.evaluate(samples) if samples and greedy is not None else None)

    def request_stop(self) -> None:
        """End the job after the step in progress (with a checkpoint); safe to call from any thread."""
        self.stop_requested = True

    def _log_step(self, row: dict, consumed: list[ConsumedSample]) -> None:
        self.result.rows.append(row)
        self.result.consumed.extend(consumed)
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        with open(self.run_dir / "consumed.jsonl", "a") as fh:
            fh.writelines(json.dumps(vars(c)) + "\n" for c in consumed)

    def _check_bad_step(self, step: int, stats: dict) -> None:
        """A step whose loss was NaN/inf was skipped by the learner; too many in a row end the job."""
        if not stats.get("learner/skipped_updates"):
            self.bad_steps = 0
            return
        self.bad_steps += 1
        m.BAD_STEPS.labels(job=self.cfg.name, pool="driver", worker="driver").inc()
        tqdm.write(f"step {step}: non-finite loss or gradient, update skipped ({self.bad_steps} in a row)")
        if self.bad_steps >= self.cfg.faults.max_bad_steps:
            raise RuntimeError(
                f"{self.bad_steps} consecutive steps had a NaN/inf loss or gradient (faults.max_bad_steps); stopping"
            )

    # ---- checkpoints and recovery --------------------------------------------------------
    async def _checkpoint(self, tg: asyncio.TaskGroup, step: int) -> None:
        """Snapshot driver state and stage every rank's state now; the files are finished in the background."""
        if self._checkpointing is not None:
            await self._checkpointing  # one checkpoint at a time
        tmp = self.checkpoints.begin(step)
        self._snapshot(step, tmp)
        digests = await asyncio.gather(*[rank.save_checkpoint.remote(str(tmp)) for rank in self.learner.ranks])
        extra = {"rank_digests": digests}
        if self.critic is not None:
            extra["critic_rank_digests"] = await asyncio.gather(
                *[rank.save_checkpoint.remote(str(tmp / CRITIC_DIR)) for rank in self.critic.ranks]
            )
        self._checkpointing = tg.create_task(self._finish_checkpoint(tmp, step, extra))

    async def _finish_checkpoint(self, tmp: Path, step: int, extra: dict) -> None:
        try:
            ranks = self.learner.ranks + (self.critic.ranks if self.critic is not None else [])
            await asyncio.gather(*[rank.wait_checkpoint.remote() for rank in ranks])
            ckpt = await asyncio.to_thread(self.checkpoints.finalize, tmp, step, step + 1, extra)
            tqdm.write(f"checkpoint {ckpt.path.name} (weight version {ckpt.version})")
        except (OSError, ray.exceptions.RayError) as exc:
            # A full disk or a dying rank must not take the job down: the previous checkpoint stays.
            self.checkpoints.abandon(tmp)
            m.CHECKPOINT_FAILURES.labels(job=self.cfg.name, pool="driver", worker="driver").inc()
            tqdm.write(f"checkpoint after step {step} failed ({exc!r}); the previous checkpoint stays in use")

    async def _recover_learner(self, tg: asyncio.TaskGroup, cause: BaseException) -> int:
        """A learner rank died: rebuild the group from the newest checkpoint; generation keeps running."""
        if self.learner_restarts >= self.cfg.faults.max_learner_restarts:
            raise RuntimeError(
                f"learner rank died and the {self.cfg.faults.max_learner_restarts} learner restarts are used up"
            ) from cause
        self.learner_restarts += 1
        m.RESTARTS.labels(job=self.cfg.name, pool="learner", worker="group").inc()
        tqdm.write(f"learner rank died ({cause!r}); rebuilding from the newest checkpoint")
        async with self._changed:
            self.timeline += 1  # results still arriving from the old timeline are dropped
        self._producer.cancel()
        await asyncio.wait([self._producer])
        if self._checkpointing is not None:
            await self._checkpointing
        self.learner.kill()
        if self.critic is not None:
            self.critic.kill()  # rebuilt with the learner, from the same checkpoint
        await asyncio.to_thread(self._start_learner)
        ckpt = self.checkpoints.latest(on_refused=lambda exc: tqdm.write(f"refusing {exc}"))
        await asyncio.to_thread(self._restore, ckpt)
        self._write_scrape_targets()
        self._producer = tg.create_task(self._produce(tg))
        return self.start_step

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
            "learner_restarts": self.learner_restarts,
            "reward_failures": sum(s.reward_components.get("reward_failed", 0.0) for s in samples),
            "multi_version_fraction": statistics.fmean(s.spans_versions for s in samples),
            "time": time.time(),
        }
        row.update({k: v for k, v in stats.items() if k not in row})
        self.labels.of(m.TRAIN_KL).set(row["kl"])
        self.labels.of(m.TRAIN_REWARD).set(row["reward_mean"])
        self.labels.of(m.TRAIN_ENTROPY).set(stats.get("policy/entropy", 0.0))
        self.labels.of(m.TRAIN_CLIP).set(stats.get("policy/clip_frac", 0.0))
        self.labels.of(m.MULTI_VERSION).set(row["multi_version_fraction"])
        self.labels.of(m.CORRECTION_ESS).set(stats.get("correction/ess", 1.0))
        self.labels.of(m.CORRECTION_MISMATCH_K1).set(stats.get("correction/mismatch_k1", 0.0))
        self.labels.of(m.CORRECTION_MISMATCH_K3).set(stats.get("correction/mismatch_k3", 0.0))
        self.labels.of(m.CORRECTION_TRUNCATED).set(stats.get("correction/frac_truncated", 0.0))
        self.labels.of(m.CORRECTION_MASKED).set(stats.get("correction/frac_masked", 0.0))
        if "critic/value_loss" in stats:
            self.labels.of(m.CRITIC_VALUE_LOSS).set(stats["critic/value_loss"])
            self.labels.of(m.CRITIC_EXPLAINED_VARIANCE).set(stats["critic/explained_variance"])
            self.labels.of(m.CRITIC_VALUE_CLIP).set(stats["critic/value_clip_frac"])
        return row

    # ---- the job -------------------------------------------------------------------------
    async def run(self) -> JobResult:
        """Run both loops to the last step; the first failure of any task ends the job with its cause."""
        try:
            self.result.accuracy_before, self.result.sampled_accuracy_before = await self._evaluate_all()
            async with asyncio.TaskGroup() as tg:
                self._producer = tg.create_task(self._produce(tg))
                watcher = tg.create_task(self._watch_scaling())
                tg.create_task(self._consume(tg, watcher))
            self.result.accuracy_after, self.result.sampled_accuracy_after = await self._evaluate_all()
            if self.result.accuracy_before is not None:
                evaluation = {"prompts": len(self.eval_prompts), "accuracy_before": self.result.accuracy_before,
                              "accuracy_after": self.result.accuracy_after, "version_after": self.published_version,
                              "samples_per_prompt": self.cfg.data.eval_samples,
                              "sampled_accuracy_before": self.result.sampled_accuracy_before,
                              "sampled_accuracy_after": self.result.sampled_accuracy_after}
                (self.run_dir / "eval.json").write_text(json.dumps(evaluation))
        except BaseExceptionGroup as group:
            # Surface the first real cause rather than an ExceptionGroup wrapper.
            first = group.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from first.__cause__  # keep the cause's own chain
        self.result.final_version = self.published_version
        return self.result


def run_job(cfg: JobConfig, resume: str | None = None) -> JobResult:
    """Run (or with `resume`, continue) one job on the connected Ray cluster (the caller has called `ray.init`)."""
    driver = Driver(cfg, resume)
    try:
        return asyncio.run(driver.run())
    finally:
        driver.shutdown()
