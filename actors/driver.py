"""The driver: a producer that runs ahead under admission control and a step loop that trains.

    producer:  admitted group -> rollout (generate -> score -> build samples) -> buffer
    step loop: take a batch (staleness checked) -> train -> publish -> report -> checkpoint when due

Everything else has a room of its own: `cluster` (pools, scaling, scrape targets), `rollout`,
`checkpointer` (snapshots, and the learner restored from one, `LearnerSlot`: built at the start and
again after a lost rank or a rollback), `trainer` (policy and critic rank groups), `reporting`,
`evaluation`, and in the library `JobState` (admission, buffer, KL controller) and
`finalize_batch` (every advantage).
Every task runs in one asyncio.TaskGroup: if any fails, the others are cancelled and the job ends
with that cause.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass

import ray
from tqdm import tqdm

from actors.checkpointer import Checkpointer, LearnerSlot, job_checkpoints, open_run
from actors.cluster import Cluster, engine_model_paths
from actors.evaluation import evaluate
from actors.reporting import JobResult, Reporter
from actors.rollout import rollout
from actors.trainer import watch_learners
from actors.workers.reference_refresh import ReferenceRefresh
from actors.workers.weight_sync import WeightSync
from rlhf_cluster.config import JobConfig
from rlhf_cluster.experience.build import observe_step_kl
from rlhf_cluster.experience.records import ScoredSample
from rlhf_cluster.job.epochs import prompts_drawn_again, steps_recounted, with_epoch_steps
from rlhf_cluster.job.guardrails import GuardVerdict, policy_held
from rlhf_cluster.job.inputs import check_inputs, prepare_inputs
from rlhf_cluster.job.preemption import StopRequest
from rlhf_cluster.job.preflight import preflight
from rlhf_cluster.run.checkpoint import Checkpoint
from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.telemetry.console import attach_console
from rlhf_cluster.telemetry.metrics import serve_metrics
from rlhf_cluster.weights import WeightStore
from rlhf_cluster.weights.messages import Publication

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepEnd:
    """What a trained step's end decided: go on, roll back (the guardrails' reason), stop early
    (the verdict's), and whether a checkpoint is due."""

    verdict: GuardVerdict | None
    roll_back: str | None = None
    early_stop: str | None = None
    checkpoint: bool = False


class Driver:
    """The two loops of one job; `Job` is its public handle."""

    # Set by the start (`_start_learner_and_pools`); a failed start has some or none.
    cluster: Cluster  # the worker pools
    reference: ReferenceRefresh  # the KL reference's folder and its refreshes

    def __init__(self, cfg: JobConfig, resume: str | None = None, overwrite: bool | str | None = False):
        attach_console()  # the job's lines (and its warnings) reach this process's console
        for warning in preflight(cfg, resume=resume):  # bad input fails here, before anything is written or started
            log.warning(warning)
        checked = check_inputs(cfg)  # a user's prompt files too, before the run is opened (or moved aside)
        self.run_dir = RunDir(cfg.run_dir, cfg.weights_dir, cfg.checkpoint_dir)
        self.store = WeightStore(cfg.weights_dir, cfg.weights.keep)
        checkpoints = job_checkpoints(cfg)
        resume_from = open_run(self.run_dir, checkpoints, resume, overwrite, cfg.name)  # nothing unverified is deleted
        self.changed = asyncio.Condition()  # the buffer, the published version or the requests in flight moved
        self.timeline = 0  # bumped by every rebuild of the learner: late results of an abandoned timeline are ignored
        self.stop = StopRequest()  # `Job.stop`, from any thread or a signal handler
        self._publishing: asyncio.Task | None = None  # the newest version's publication
        try:
            if resume_from is not None:
                self.run_dir.event("resumed", from_step=resume_from.step)
            self.inputs = prepare_inputs(cfg, self.run_dir, checked)
            # The config the job runs with, from here on (train.total_epochs counted into train.total_steps).
            self.cfg = cfg = with_epoch_steps(cfg, len(self.inputs.prompts))
            if resume_from is not None and (recounted := steps_recounted(self.run_dir.root / RunDir.CONFIG, cfg)):
                log.warning(recounted)
            if drawn_again := prompts_drawn_again(cfg, len(self.inputs.prompts)):
                log.warning(drawn_again)
            self.reporter = Reporter(cfg, self.run_dir)
            self.reporter.tokenizer = self.inputs.tokenizer
            self.checkpointer = Checkpointer(cfg, self.run_dir, self.store, self.reporter, checkpoints)
            self.weights = WeightSync(self.reporter.receipts)  # every version's way to the engines
            self.learner = LearnerSlot(cfg, self.inputs, self.checkpointer, self.reporter, self.weights, resume_from)
            self.run_dir.write_yaml(RunDir.CONFIG, cfg.model_dump(mode="json"))
            self.metrics_port = (
                serve_metrics(cfg.metrics.bind_address, port_range=cfg.metrics.port_range)
                if cfg.metrics.enabled
                else None
            )
            self._start_learner_and_pools(resume_from)
        except BaseException as exc:
            self.record_failure(exc)
            self.shutdown()  # no actor outlives a failed start
            raise

    def _start_learner_and_pools(self, resume_from: Checkpoint | None) -> None:
        """The learner's ranks (in a thread) and the worker pools start at the same time
        (`LearnerSlot.starting`: int8 engines wait for the learner's int8 variant)."""
        start_version = resume_from.version if resume_from is not None else 0
        self.reference = ReferenceRefresh(  # the KL reference's folder (algorithm.kl.reference_refresh)
            self.cfg, self.run_dir, self.store, self.inputs.model_path, start_version, self.checkpointer.kept_versions
        )
        driver = (
            {"driver": {"metrics": f"{self.cfg.metrics.bind_address}:{self.metrics_port}"}} if self.metrics_port else {}
        )
        with self.learner.starting(resume_from):
            self.cluster = Cluster(
                self.cfg,
                self.run_dir,
                self.inputs.model_path,
                engine_model_paths(
                    self.cfg, self.inputs.model_path, self.store, self.learner.published_version, self.run_dir
                ),
                other_targets=lambda: {**self.learner.trainer.infos, "driver": driver},
                weights=self.weights,
                reference=self.reference,
            )
        self.weights.first()  # every engine holds the learner's start before anything is generated
        self.cluster.write_scrape_targets()

    async def run(self) -> JobResult:
        """Run both loops to the last step; the first failure of any task ends the job with its cause."""
        result, held_out = self.reporter.result, self.inputs.eval_prompts
        self.stop.bind(asyncio.get_running_loop(), lambda: _notify(self.changed))
        self.reporter.open_trackers(self.learner.state.start_step)  # (blocks the loop before any watcher runs)
        try:
            result.evaluation_before = await evaluate(
                self.cluster, held_out, self.learner.published_version, self.cfg.data
            )
            async with asyncio.TaskGroup() as tg:
                self._producer = tg.create_task(self._produce(tg))
                self._watcher = tg.create_task(
                    self.cluster.watch(lambda: self.learner.published_version, self.reporter.trace)
                )
                self._learner_watch = tg.create_task(
                    watch_learners(lambda: self.learner.trainer, self.cfg.faults, self.reporter.trace)
                )
                tg.create_task(self._steps(tg))
            if not self.stop.requested:  # a stopped job (e.g. preempted) is continued, not evaluated
                result.evaluation_after = await evaluate(
                    self.cluster, held_out, self.learner.published_version, self.cfg.data
                )
                self.reporter.evaluation(len(held_out), self.learner.published_version, self.cfg.data.eval_samples)
        except BaseExceptionGroup as group:
            first = _first_cause(group)
            raise first from first.__cause__  # the cause itself, its own chain kept
        # The spans every actor recorded since its last heartbeat: the trace covers the whole run.
        self.reporter.trace(
            await self.cluster.collect_spans()
            + await self.learner.trainer.collect_spans(self.cfg.faults.heartbeat_timeout_s)
        )
        result.final_version, result.stopped = self.learner.published_version, self.stop.requested
        return result

    # ---- producer ------------------------------------------------------------------------
    async def _produce(self, tg: asyncio.TaskGroup) -> None:
        """Start one request per admitted group (or batch of groups) while admission allows."""
        admission, workers = self.learner.state.admission, self.cluster.pools["generation"]
        in_flight: set[asyncio.Task] = set()

        def finished(task: asyncio.Task) -> None:
            in_flight.discard(task)
            asyncio.get_running_loop().create_task(_notify(self.changed))

        try:
            while True:
                async with self.changed:
                    await self.changed.wait_for(
                        lambda: admission.may_start(self.learner.published_version, len(in_flight), len(workers))
                    )
                    key, prompts = admission.admit(self.learner.published_version)
                task = tg.create_task(self._rollout(key, prompts, self.timeline))
                in_flight.add(task)
                task.add_done_callback(finished)
        finally:
            # The step loop is done (or the job failed): requests still running are not needed.
            for task in list(in_flight):
                task.cancel()

    async def _rollout(self, key: int, prompts: list, timeline: int) -> None:
        """Generate and score one request's groups, then buffer them (or drop those without signal)."""
        groups = await rollout(self.cfg, self.cluster, prompts, self.learner.published_version, self.learner.state.kl)
        async with self.changed:
            if timeline != self.timeline:
                return  # generated for a timeline a rebuild abandoned (a rollback, a lost rank)
            self.learner.state.admission.buffered(key)
            failed: dict[str, int] = {}  # worker -> samples whose reward failed, one event row per request
            for g in groups:
                dropped = self.learner.state.add_group(g.samples, g.metrics, g.worker, g.failed)
                self.reporter.dropped("reward_failed", g.failed)  # left out of a group that kept the rest
                if g.failed or dropped == "reward_failed":
                    failed[g.worker] = failed.get(g.worker, 0) + (g.failed or len(g.samples))
                if dropped is None:
                    self.reporter.group_buffered(g.samples, g.worker, g.requested_at, g.generated_at)
                else:
                    self.reporter.dropped(dropped, len(g.samples))
            for worker, samples in failed.items():
                self.run_dir.event("reward_failed", worker=worker, samples=samples)
            self.reporter.buffer_depth(self.learner.state.buffer.depth)
            self.changed.notify_all()

    # ---- step loop -----------------------------------------------------------------------
    async def _steps(self, tg: asyncio.TaskGroup) -> None:
        """One iteration per learner step, to `train.total_steps` or a requested stop."""
        total = self.cfg.train.total_steps
        step = self.learner.state.start_step
        bar = tqdm(total=total, initial=step, desc="train", disable=not self.cfg.train.progress, dynamic_ncols=True)
        last, checkpointed, began = time.perf_counter(), None, time.time()
        try:
            while step < total and not self.stop.requested:
                with self.reporter.span("wait_for_batch", step=step):
                    waited = time.perf_counter()
                    samples = await self._take(step)
                    waited = time.perf_counter() - waited
                if samples is None:  # stopped while the batch was gathering
                    break
                try:
                    with self.reporter.span("train", step=step):
                        stats, published = await self.learner.trainer.train(step, samples, self.learner.state.kl.value)
                except ray.exceptions.RayActorError as exc:  # a rank died: back to the newest checkpoint
                    step = await self._rebuild_learner(tg, await self.learner.after_death(exc))
                    bar.reset(total)
                    bar.update(step)
                    continue
                if not policy_held(stats):  # a critic warm-up step: the policy did not move
                    observe_step_kl(self.learner.state.kl, stats["policy/kl"], samples)
                self._publishing = tg.create_task(self._publish(step + 1, published, self.timeline, self._publishing))
                end = await self._end_step(step, samples, stats, waited, time.perf_counter() - last, began)
                if end.roll_back is not None:  # this step is not checkpointed: back to the last good one
                    start = await self._rebuild_learner(tg, await self.learner.roll_back(step, end.roll_back))
                    self.reporter.rollback(step, start - 1, end.roll_back, self.learner.override.apply(self.cfg))
                    step = start
                    bar.reset(total)
                    bar.update(step)
                    last, began = time.perf_counter(), time.time()
                    continue
                last, began = time.perf_counter(), time.time()  # an evaluation is in neither step's time
                bar.update(1)
                if self.reference.due(step + 1):  # the KL reference moves to this step's version
                    self.reference.refresh(tg, step + 1, self._publishing, self.learner.trainer.wait_persisted)
                if end.checkpoint:
                    with self.reporter.span("checkpoint", step=step):
                        await self.reference.written()  # a resume from it finds its version's reference
                        await self.checkpointer.save(tg, step, self.learner.trainer, self.learner.state, end.verdict)
                    checkpointed = step
                step += 1
                if end.early_stop is not None:  # the job ends as if at its last step: evaluated, reported
                    self.reporter.result.early_stop = end.early_stop
                    break
            if self.stop.requested and step > self.learner.state.start_step and checkpointed != step - 1:
                await self.reference.written()  # no trained step is lost:
                await self.checkpointer.save(tg, step - 1, self.learner.trainer, self.learner.state)
            await self.checkpointer.wait()  # the final checkpoint is complete before the job reports done
            await self.learner.trainer.wait_persisted()
        finally:
            bar.close()
            self._producer.cancel()
            self._watcher.cancel()
            self._learner_watch.cancel()
        # Scored samples not yet trained on are kept, in the buffer's on-disk (Arrow) format.
        self.learner.state.buffer.save(self.run_dir / RunDir.BUFFER)

    async def _end_step(
        self, step: int, samples: list[ScoredSample], stats: dict, waited: float, seconds: float, began: float
    ) -> StepEnd:
        """A trained step's end: its counters (and the held-out evaluation where one is due), the
        guardrails' verdict, the step's report, and what follows: a rollback, an early stop, a
        checkpoint. `seconds`: the step's time (an evaluation is not in it); `began`: its wall start."""
        counters = {
            **self.learner.state.counters(),
            "worker_restarts": self.cluster.restarts(),
            "learner_restarts": self.learner.restarts,
            "learner_wait_seconds": waited,
            "scored_log_failed_flushes": self.learner.state.log.failed_flushes,
            "scored_log_unflushed_groups": self.learner.state.log.unflushed,
            **self.cluster.busy_shares(began, time.time()),
            **({"reference_version": self.reference.version} if self.reference.every else {}),
        }
        every, total = self.cfg.data.eval_every_steps, self.cfg.train.total_steps
        if every and (step + 1) % every == 0 and step + 1 < total:  # the last step's is the final one (eval.json)
            if self._publishing is not None:  # the step's version, held by the engines
                await asyncio.wait([self._publishing])
            with self.reporter.span("evaluate", version=self.learner.published_version):
                counters.update(
                    await evaluate(
                        self.cluster, self.inputs.eval_prompts, self.learner.published_version, self.cfg.data
                    )
                )
        verdict = self.learner.guard.observe(step, counters)  # None unless this step evaluated the watched metric
        row = self.reporter.step(step, samples, stats, seconds, counters, self.learner.state.worker_of)
        self.cluster.autoscaling.observe(row)  # `scaling.auto`: its resizes run in Cluster.watch, beside the steps
        if verdict is not None:
            self.reporter.guardrails(verdict)
        reason = self.learner.rollback.tripped(self.reporter.result.rows[-1], self.learner.guard, verdict)
        if reason is not None:
            return StepEnd(verdict, roll_back=reason)
        with self.reporter.span("scored_log.flush", step=step):  # the groups scored so far survive a kill
            await asyncio.to_thread(self.learner.state.log.flush_or_keep)
        early_stop = verdict.stop if verdict is not None else None
        last = step + 1 == self.cfg.train.total_steps or self.stop.requested or early_stop is not None
        due = self.checkpointer.due(step, last, verdict)
        return StepEnd(verdict, early_stop=early_stop, checkpoint=due)

    async def _take(self, step: int) -> list[ScoredSample] | None:
        """The step's batch, once enough admissible groups are buffered (None if a stop is
        requested first); stale ones are dropped."""
        async with self.changed:
            while True:
                samples, dropped = self.learner.state.take(step)
                if dropped:
                    self.reporter.dropped("stale", dropped)
                    self.changed.notify_all()  # dropped groups free admission: the producer regenerates them
                if samples is not None:
                    self.reporter.buffer_depth(self.learner.state.buffer.depth)
                    return samples
                if self.stop.requested:
                    return None
                try:  # wake now and then even if nothing arrives: `take` runs the no-progress watchdog
                    async with asyncio.timeout(self.learner.state.watchdog.poll_s()):
                        await self.changed.wait()
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
            self.learner.published_version = max(self.learner.published_version, version)
            self.reporter.version(self.learner.published_version)
            self.changed.notify_all()
        if previous is not None and not previous.done():  # (a done one: no yield, the push goes out now)
            await asyncio.wait([previous])
        if timeline != self.timeline:
            return
        with self.reporter.span("weights.push", version=version):
            await self.weights.push(delivery)

    async def _rebuild_learner(self, tg: asyncio.TaskGroup, ckpt: Checkpoint | None) -> int:
        """New learner ranks from `ckpt` (None: the start), after a lost rank (`LearnerSlot.after_death`)
        or a rollback (`LearnerSlot.roll_back`); generation keeps running, and results of the
        abandoned timeline are dropped. Returns the next step."""
        async with self.changed:
            self.timeline += 1  # results still arriving from the old timeline are dropped
        self._producer.cancel()
        await asyncio.wait([self._producer])
        self.learner.trainer.kill()  # (refreshes waiting for its publications end at once)
        await self.reference.abandon()  # refreshes in flight end before the rebuild discards their versions
        await self.learner.rebuild(ckpt)  # the critic is rebuilt with the learner, from the same checkpoint
        self._publishing = None  # the old timeline's pushes end without pushing
        await self.weights.restore()  # every engine holds the restored version before new groups start
        await self.reference.restore(self.learner.published_version)  # and the reference that version calls for
        self.cluster.write_scrape_targets()
        self._producer = tg.create_task(self._produce(tg))
        return self.learner.state.start_step

    def record_failure(self, exc: BaseException) -> None:
        """The job ends with `exc`: its one-line cause as events.jsonl's `failed` row, written here,
        in the driver, while it holds the run directory. A stop (KeyboardInterrupt, a cancellation)
        is no failure; a row that cannot be written is a warning, never in the way of the cause."""
        if not isinstance(exc, Exception) or getattr(self.run_dir, "lock", None) is None:
            return
        try:
            self.run_dir.failed(exc)
        except Exception as err:  # e.g. a full disk: the job's own error is the one to raise
            log.warning(f"{self.run_dir.root / RunDir.EVENTS}: the job's failure was not recorded: {err!r}")

    def shutdown(self) -> None:
        """End every actor of the job (safe after a failed start), then the trackers' runs."""
        if hasattr(self, "cluster"):
            self.cluster.shutdown()
        if hasattr(self, "learner") and hasattr(self.learner, "trainer"):
            self.learner.trainer.kill()
        self.run_dir.release()
        if hasattr(self, "reporter"):
            self.reporter.close()


def _first_cause(group: BaseExceptionGroup) -> BaseException:
    """The first real cause inside (nested) exception groups."""
    first = group.exceptions[0]
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


async def _notify(changed: asyncio.Condition) -> None:
    async with changed:
        changed.notify_all()
