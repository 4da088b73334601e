"""The driver: a producer that runs ahead under admission control and a step loop that trains.

    producer:  admitted group -> rollout (generate -> score -> build samples) -> buffer
    step loop: take a batch (staleness checked) -> train -> publish -> report -> checkpoint when due

Everything else has a room of its own: `cluster` (pools, scaling, scrape targets), `rollout`,
`trainer` (policy and critic rank groups), `checkpointer` (snapshots, and the learner built
from one), `reporting`, `evaluation`, and in the library `JobState` (admission, buffer, KL
controller) and `finalize_batch` (every advantage).
Every task runs in one asyncio.TaskGroup: if any fails, the others are cancelled and the job ends
with that cause.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor

import ray
from tqdm import tqdm

from actors.checkpointer import Checkpointer, LearnerStart, build_learner
from actors.cluster import Cluster, engine_model_paths
from actors.evaluation import evaluate
from actors.reporting import JobResult, Reporter
from actors.rollout import rollout
from actors.trainer import Trainer
from actors.workers.weight_sync import WeightSync
from rlhf_cluster.config import JobConfig
from rlhf_cluster.experience.build import observe_step_kl
from rlhf_cluster.experience.records import ScoredSample
from rlhf_cluster.job.guardrails import RollbackGuard
from rlhf_cluster.job.inputs import prepare_inputs
from rlhf_cluster.job.preflight import preflight
from rlhf_cluster.run.checkpoint import Checkpoint
from rlhf_cluster.run.job_state import JobState
from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.run.scored_log import ScoredLogFlushError
from rlhf_cluster.telemetry.console import attach_console
from rlhf_cluster.telemetry.metrics import serve_metrics
from rlhf_cluster.weights import WeightStore
from rlhf_cluster.weights.messages import Delivery, Publication

log = logging.getLogger(__name__)


class Driver:
    """The two loops of one job and the recovery of a lost learner; `Job` is its public handle."""

    def __init__(self, cfg: JobConfig, resume: str | None = None, overwrite: bool | str | None = False):
        attach_console()  # the job's lines (and its warnings) reach this process's console
        for warning in preflight(cfg, resume=resume):  # bad input fails here, before anything is written or started
            log.warning(warning)
        self.cfg = cfg
        self.run_dir = RunDir(cfg.run_dir, cfg.weights_dir, cfg.checkpoint_dir)
        self.store = WeightStore(cfg.weights_dir, cfg.weights.keep)
        self.reporter = Reporter(cfg, self.run_dir)
        self.checkpointer = Checkpointer(cfg, self.run_dir, self.store, self.reporter)
        resume_from = self.checkpointer.open_run(resume, overwrite, cfg.name)  # nothing unverified is deleted
        self.changed = asyncio.Condition()  # the buffer, the published version or the requests in flight moved
        self.timeline = 0  # bumped by every rollback: late results of an abandoned timeline are ignored
        self.learner_restarts = 0
        g = cfg.guardrails
        self.rollback = RollbackGuard(g.rollback, g.metric, g.higher_is_better)  # its count spans rebuilds
        self._stop = threading.Event()  # set by `request_stop` from any thread or a signal handler
        self.loop: asyncio.AbstractEventLoop | None = None  # where `request_stop` wakes the step loop
        self._trainer: Trainer | None = None  # with `_cluster` and `_state`: set by the start (read as properties)
        self.delivery: Delivery | None = None
        # Every version's way to the engines; a transport whose sender takes part in each push
        # reaches the current learner's rank 0.
        self.weights = WeightSync(cfg.name, lambda delivery: self.trainer.send(delivery), self.reporter.probes)
        self._publishing: asyncio.Task | None = None  # the newest version's publication
        self._cluster: Cluster | None = None
        self._state: JobState | None = None
        self.published_version = 0
        try:
            self.inputs = prepare_inputs(cfg, self.run_dir)
            self.reporter.tokenizer = self.inputs.tokenizer
            self.run_dir.write_yaml(RunDir.CONFIG, cfg.model_dump(mode="json"))
            self.metrics_port = (
                serve_metrics(cfg.metrics.bind_address, port_range=cfg.metrics.port_range)
                if cfg.metrics.enabled
                else None
            )
            self._start_learner_and_pools(resume_from)
        except BaseException:
            self.shutdown()  # no actor outlives a failed start
            raise

    def _start_learner_and_pools(self, resume_from: Checkpoint | None) -> None:
        """The learner's ranks (in a thread) and the worker pools start at the same time: each loads
        a model, and vLLM's engine start is the longest. Int8 engines start from the learner's
        int8 variant of the job's version, so with int8 rollouts the pools wait for the learner."""
        with ThreadPoolExecutor(1, thread_name_prefix="learner-start") as starter:
            learner = starter.submit(self._build_learner, resume_from, None)
            try:
                if "int8" in self.cfg.generation.weight_variants:
                    self._adopt_learner(learner.result())
                self._cluster = Cluster(
                    self.cfg,
                    self.run_dir,
                    self.inputs.model_path,
                    engine_model_paths(
                        self.cfg, self.inputs.model_path, self.store, self.published_version, self.run_dir
                    ),
                    other_targets=self._scrape_targets,
                    weights=self.weights,
                )
            finally:
                started = learner.result()  # waited for (its ranks are ours to end) even when the pools failed to start
                if self._trainer is None:
                    self._adopt_learner(started)
        if self.delivery is not None:
            self.weights.first(self.delivery)
            self.delivery = None  # WeightSync holds the newest; nothing here pins old buckets
        self.cluster.write_scrape_targets()

    def _build_learner(self, ckpt: Checkpoint | None, previous: JobState | None) -> LearnerStart:
        """Blocking, run in a worker thread: reads the driver, assigns nothing of it."""
        return build_learner(self.cfg, self.inputs, self.checkpointer, self.run_dir, ckpt, previous)

    def _adopt_learner(self, start: LearnerStart) -> None:
        """The built learner becomes the job's, on the driver's thread."""
        if start.cfg is not self.cfg:  # faults.elastic: fewer learner ranks from now on (the checkpoint reshards)
            self.cfg = self.checkpointer.cfg = start.cfg
        self._trainer, self._state, self.guard = start.trainer, start.state, start.guard
        self.published_version, self.delivery = start.published_version, start.delivery
        self.reporter.learner_ranks(start.cfg.learner.world_size)
        self.reporter.version(start.published_version)

    @property
    def trainer(self) -> Trainer:
        """The learner's rank groups (the current ones: a rebuild replaces them)."""
        if self._trainer is None:
            raise RuntimeError("the job's learner is not started (the driver's start failed or is under way)")
        return self._trainer

    @property
    def state(self) -> JobState:
        """The job state the current learner was built with."""
        if self._state is None:
            raise RuntimeError("the job's state is not built (the driver's start failed or is under way)")
        return self._state

    @property
    def cluster(self) -> Cluster:
        """The worker pools."""
        if self._cluster is None:
            raise RuntimeError("the job's worker pools are not started (the driver's start failed or is under way)")
        return self._cluster

    def _scrape_targets(self) -> dict[str, dict[str, dict]]:
        driver = (
            {"driver": {"metrics": f"{self.cfg.metrics.bind_address}:{self.metrics_port}"}} if self.metrics_port else {}
        )
        return {**self.trainer.infos, "driver": driver}

    async def run(self) -> JobResult:
        """Run both loops to the last step; the first failure of any task ends the job with its cause."""
        result, held_out = self.reporter.result, self.inputs.eval_prompts
        self.loop = asyncio.get_running_loop()
        try:
            result.evaluation_before = await evaluate(self.cluster, held_out, self.published_version, self.cfg.data)
            async with asyncio.TaskGroup() as tg:
                self._producer = tg.create_task(self._produce(tg))
                self._watcher = tg.create_task(self.cluster.watch(lambda: self.published_version, self.reporter.trace))
                self._learner_watch = tg.create_task(self._watch_learner())
                tg.create_task(self._steps(tg))
            if not self.stop_requested:  # a stopped job (e.g. preempted) is continued, not evaluated
                result.evaluation_after = await evaluate(self.cluster, held_out, self.published_version, self.cfg.data)
                self.reporter.evaluation(len(held_out), self.published_version, self.cfg.data.eval_samples)
        except BaseExceptionGroup as group:
            first = _first_cause(group)
            raise first from first.__cause__  # the cause itself, its own chain kept
        # The spans every actor recorded since its last heartbeat: the trace covers the whole run.
        self.reporter.trace(
            await self.cluster.collect_spans() + await self.trainer.collect_spans(self.cfg.faults.heartbeat_timeout_s)
        )
        result.final_version, result.stopped = self.published_version, self.stop_requested
        return result

    # ---- producer ------------------------------------------------------------------------
    async def _produce(self, tg: asyncio.TaskGroup) -> None:
        """Start one request per admitted group (or batch of groups) while admission allows."""
        admission, workers = self.state.admission, self.cluster.pools["generation"]
        in_flight: set[asyncio.Task] = set()

        async def notify() -> None:
            async with self.changed:
                self.changed.notify_all()

        def finished(task: asyncio.Task) -> None:
            in_flight.discard(task)
            asyncio.get_running_loop().create_task(notify())

        try:
            while True:
                async with self.changed:
                    await self.changed.wait_for(
                        lambda: admission.may_start(self.published_version, len(in_flight), len(workers))
                    )
                    key, prompts = admission.admit(self.published_version)
                task = tg.create_task(self._rollout(key, prompts, self.timeline))
                in_flight.add(task)
                task.add_done_callback(finished)
        finally:
            # The step loop is done (or the job failed): requests still running are not needed.
            for task in list(in_flight):
                task.cancel()

    async def _rollout(self, key: int, prompts: list, timeline: int) -> None:
        """Generate and score one request's groups, then buffer them (or drop those without signal)."""
        groups = await rollout(self.cfg, self.cluster, prompts, self.published_version, self.state.kl)
        async with self.changed:
            if timeline != self.timeline:
                return  # generated for a timeline a rollback abandoned
            self.state.admission.buffered(key)
            for g in groups:
                dropped = self.state.add_group(g.samples, g.metrics, g.worker, g.failed)
                self.reporter.dropped("reward_failed", g.failed)  # left out of a group that kept the rest
                if dropped is None:
                    self.reporter.group_buffered(g.samples, g.worker, g.requested_at, g.generated_at)
                else:
                    self.reporter.dropped(dropped, len(g.samples))
            self.reporter.buffer_depth(self.state.buffer.depth)
            self.changed.notify_all()

    # ---- step loop -----------------------------------------------------------------------
    async def _steps(self, tg: asyncio.TaskGroup) -> None:
        """One iteration per learner step, to `train.total_steps` or a requested stop."""
        total = self.cfg.train.total_steps
        step = self.state.start_step
        bar = tqdm(total=total, initial=step, desc="train", disable=not self.cfg.train.progress, dynamic_ncols=True)
        last, checkpointed, began = time.perf_counter(), None, time.time()
        try:
            while step < total and not self.stop_requested:
                with self.reporter.span("wait_for_batch", step=step):
                    waited = time.perf_counter()
                    samples = await self._take(step)
                    waited = time.perf_counter() - waited
                if samples is None:  # stopped while the batch was gathering
                    break
                try:
                    with self.reporter.span("train", step=step):
                        stats, published = await self.trainer.train(step, samples, self.state.kl.value)
                except ray.exceptions.RayActorError as exc:
                    step = await self._recover_learner(tg, exc)
                    bar.reset(total)
                    bar.update(step)
                    continue
                observe_step_kl(self.state.kl, stats["policy/kl"], samples)
                self._publishing = tg.create_task(self._publish(step + 1, published, self.timeline, self._publishing))
                counters = {
                    **self.state.counters(),
                    "worker_restarts": self.cluster.restarts(),
                    "learner_restarts": self.learner_restarts,
                    "learner_wait_seconds": waited,
                    "scored_log_failed_flushes": self.state.log.failed_flushes,
                    "scored_log_unflushed_groups": self.state.log.unflushed,
                    **self.cluster.busy_shares(began, time.time()),
                }
                now = time.perf_counter()
                every = self.cfg.data.eval_every_steps  # the last step's evaluation is the final one (eval.json)
                if every and (step + 1) % every == 0 and step + 1 < total:
                    await asyncio.wait([self._publishing])  # the step's version, held by the engines
                    with self.reporter.span("evaluate", version=self.published_version):
                        counters.update(
                            await evaluate(
                                self.cluster, self.inputs.eval_prompts, self.published_version, self.cfg.data
                            )
                        )
                verdict = self.guard.observe(step, counters)  # None unless this step evaluated the watched metric
                self.reporter.step(step, samples, stats, now - last, counters, self.state.worker_of)
                if verdict is not None:
                    self.reporter.guardrails(verdict)
                reason = self.rollback.tripped(self.reporter.result.rows[-1], self.guard, verdict)
                if reason is not None:  # this step is not checkpointed: back to the last good one
                    step = await self._roll_back(tg, step, reason)
                    bar.reset(total)
                    bar.update(step)
                    last, began = time.perf_counter(), time.time()
                    continue
                with self.reporter.span("scored_log.flush", step=step):  # the groups scored so far survive a kill
                    await self._flush_scored_log()
                last, began = time.perf_counter(), time.time()  # an evaluation is in neither step's time
                bar.update(1)
                early_stop = verdict.stop if verdict is not None else None
                if self.checkpointer.due(step, self.stop_requested or early_stop is not None, verdict):
                    with self.reporter.span("checkpoint", step=step):
                        await self.checkpointer.save(tg, step, self.trainer, self.state, verdict)
                    checkpointed = step
                step += 1
                if early_stop is not None:  # the job ends as if at its last step: evaluated, reported
                    self.reporter.result.early_stop = early_stop
                    break
            if self.stop_requested and step > self.state.start_step and checkpointed != step - 1:
                await self.checkpointer.save(tg, step - 1, self.trainer, self.state)  # no trained step is lost
            await self.checkpointer.wait()  # the final checkpoint is complete before the job reports done
            await self.trainer.wait_persisted()
        finally:
            bar.close()
            self._producer.cancel()
            self._watcher.cancel()
            self._learner_watch.cancel()
        # Scored samples not yet trained on are kept, in the buffer's on-disk (Arrow) format.
        self.state.buffer.save(self.run_dir / RunDir.BUFFER)

    async def _take(self, step: int) -> list[ScoredSample] | None:
        """The step's batch, once enough admissible groups are buffered (None if a stop is
        requested first); stale ones are dropped."""
        async with self.changed:
            while True:
                samples, dropped = self.state.take(step)
                if dropped:
                    self.reporter.dropped("stale", dropped)
                    self.changed.notify_all()  # dropped groups free admission: the producer regenerates them
                if samples is not None:
                    self.reporter.buffer_depth(self.state.buffer.depth)
                    return samples
                if self.stop_requested:
                    return None
                try:  # wake now and then even if nothing arrives: `take` runs the no-progress watchdog
                    await asyncio.wait_for(self.changed.wait(), self.state.watchdog.poll_s())
                except TimeoutError:
                    pass

    async def _publish(
        self, version: int, published: Awaitable[Publication], timeline: int, previous: asyncio.Task | None
    ) -> None:
        """Once `version` is `published` (durable in the store, or packed for delivery): admission
        moves on and every engine loads it, after `previous` version's push: versions arrive in order."""
        try:
            delivery = (await published).delivery
        except ray.exceptions.RayActorError:
            return  # the learner died; the step loop rolls back to the newest checkpoint
        async with self.changed:
            if timeline != self.timeline:
                return
            self.published_version = max(self.published_version, version)
            self.reporter.version(self.published_version)
            self.changed.notify_all()
        if previous is not None and not previous.done():  # (a done one: no yield, the push goes out now)
            await asyncio.wait([previous])
        if timeline != self.timeline:
            return
        with self.reporter.span("weights.push", version=version):
            await self.weights.push(delivery)

    async def _watch_learner(self) -> None:
        """Heartbeat the learner's ranks, and after a rollback the new ranks: a hung rank is
        killed, so the step in flight fails and `_recover_learner` rolls back as for a dead one."""
        while True:
            trainer = self.trainer
            await trainer.watch(self.cfg.faults, self.reporter.trace)
            while self.trainer is trainer:  # until the rollback has built the next ranks
                await asyncio.sleep(self.cfg.faults.heartbeat_interval_s)

    async def _flush_scored_log(self) -> None:
        """A full disk must not end the job nor lose groups: they stay pending for the next flush."""
        try:
            await asyncio.to_thread(self.state.log.flush)
        except ScoredLogFlushError as exc:
            log.warning("%s", exc)

    async def _recover_learner(self, tg: asyncio.TaskGroup, cause: BaseException) -> int:
        """A learner rank died: rebuild the groups from the newest checkpoint; generation keeps running."""
        if self.learner_restarts >= self.cfg.faults.max_learner_restarts:
            raise RuntimeError(
                f"learner rank died and the {self.cfg.faults.max_learner_restarts} learner restarts are used up"
            ) from cause
        self.learner_restarts += 1
        self.reporter.restart("learner", "group")
        log.info(f"learner rank died ({cause!r}); rebuilding from the newest checkpoint")
        await self.checkpointer.wait()
        return await self._rebuild_learner(tg, self.checkpointer.newest())

    async def _roll_back(self, tg: asyncio.TaskGroup, step: int, reason: str) -> int:
        """A guardrails condition held at `step`: the learner is rebuilt from the last good
        checkpoint with adjusted settings (`RollbackGuard`); later checkpoints are set aside."""
        self.cfg = self.rollback.adjusted(self.cfg, reason)  # an error once the rollbacks are used up
        self.checkpointer.cfg = self.cfg
        await self.checkpointer.wait()
        target = self.checkpointer.roll_back_to(self.rollback.last_good_step(step, reason))
        start = await self._rebuild_learner(tg, target)
        self.reporter.rollback(step, start - 1, reason, self.cfg)
        return start

    async def _rebuild_learner(self, tg: asyncio.TaskGroup, ckpt: Checkpoint | None) -> int:
        """New learner ranks from `ckpt` (None: the start); generation keeps running, and results of
        the abandoned timeline are dropped. Returns the next step."""
        async with self.changed:
            self.timeline += 1  # results still arriving from the old timeline are dropped
        self._producer.cancel()
        await asyncio.wait([self._producer])
        self.trainer.kill()  # the critic is rebuilt with the learner, from the same checkpoint
        self._adopt_learner(await asyncio.to_thread(self._build_learner, ckpt, self.state))
        self._publishing = None  # the old timeline's pushes end without pushing
        if self.delivery is not None:  # every engine holds the restored version before new groups start
            await self.weights.push(self.delivery, rollback=True)
            self.delivery = None  # WeightSync holds the newest; nothing here pins old buckets
        self.cluster.write_scrape_targets()
        self._producer = tg.create_task(self._produce(tg))
        return self.state.start_step

    def request_stop(self) -> None:
        """End the job after the step in progress, or at once if it is waiting for its batch, with
        a checkpoint of the last trained step; safe to call from any thread or a signal handler."""
        self._stop.set()
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(lambda: loop.create_task(self._wake()))

    async def _wake(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def shutdown(self) -> None:
        """End every actor of the job (safe after a failed start)."""
        if self._cluster is not None:
            self._cluster.shutdown()
        if self._trainer is not None:
            self._trainer.kill()
        self.run_dir.release()


def _first_cause(group: BaseExceptionGroup) -> BaseException:
    """The first real cause inside (nested) exception groups."""
    first = group.exceptions[0]
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first
