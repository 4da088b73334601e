"""Checkpointing: snapshot the whole job (the JobState, every rank's state) without stopping the
step loop, and restore it: on `--resume`, and when a lost learner is rebuilt.

The learner restored (`LearnerSlot`): its rank groups and what they were built with (a job state
restored beside them, the guardrails' evaluation guard, the run's override of the config, the
version they published), built at the job's start beside the worker pools and again from a
checkpoint when a rank dies or the guardrails roll the run back. `build_learner` is the blocking
build, run in a worker thread; it returns a `LearnerStart` that `LearnerSlot.adopt` takes on the
driver's thread, so no thread assigns the job's state. What the driver's loops own around a
rebuild (the timeline, the producer, the reference's refreshes) stays in the driver."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import ray

from actors.reporting import Reporter
from actors.trainer import Trainer, start_trainer
from actors.workers.weight_sync import WeightSync
from rlhf_cluster.config import DeepSpeedBackend, JobConfig
from rlhf_cluster.job.guardrails import EvalGuard, GuardVerdict, RollbackGuard
from rlhf_cluster.job.inputs import JobInputs
from rlhf_cluster.job.override import JobOverride
from rlhf_cluster.run.checkpoint import MANIFEST, Checkpoint, CheckpointError, CheckpointStore
from rlhf_cluster.run.job_state import JobState
from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.weights import WeightStore
from rlhf_cluster.weights.messages import Delivery

log = logging.getLogger(__name__)


def job_checkpoints(cfg: JobConfig) -> CheckpointStore:
    """The job's checkpoint folder, with its retention (`checkpoint.keep`, `guardrails.keep_best`)."""
    g = cfg.guardrails
    return CheckpointStore(cfg.checkpoint_dir, cfg.checkpoint.keep, g.keep_best, g.higher_is_better)


def open_run(
    run_dir: RunDir, checkpoints: CheckpointStore, resume: str | None, overwrite: bool | str | None, job_name: str
) -> Checkpoint | None:
    """Lock the run directory (one job per run_dir), then pick the checkpoint to resume from and
    prepare the directory: resumed, or fresh with an earlier run refused / moved aside / deleted
    as `overwrite` says. `--resume auto` with no checkpoint at all starts over with the earlier
    files moved aside; with checkpoints of which none verifies it is refused
    (`NoVerifiedCheckpoint`) and nothing on disk changes. Returns the checkpoint (None: fresh)."""
    run_dir.acquire(job_name)  # before judging checkpoints: a live job's are not ours to rename
    try:
        # `auto`: the newest that verifies (None without any); a path: exactly that one.
        resume_from = (
            None if resume is None else newest(checkpoints) if resume == "auto" else checkpoints.verify(resume)
        )
        run_dir.prepare(
            fresh=resume_from is None,
            job_name=job_name,
            overwrite=overwrite or ("aside" if resume is not None else False),
        )
        if resume_from is not None and overwrite:  # (without a checkpoint it applies to the fresh start)
            log.warning(f"--overwrite is not applied: --resume {resume} continues the run from {resume_from.path.name}")
    except BaseException:
        run_dir.release()
        raise
    return resume_from


def newest(checkpoints: CheckpointStore) -> Checkpoint | None:
    """The newest checkpoint that verifies; newer ones that do not are kept aside, not deleted,
    and when none verifies the job stops (`NoVerifiedCheckpoint`) rather than start over. Call it
    holding the run directory's lock."""
    return checkpoints.resume_point(on_refused=partial(_refused, checkpoints))


def _refused(checkpoints: CheckpointStore, path: Path, exc: CheckpointError) -> None:
    # Left under its name, a later checkpoint of the same step (or retention) would delete it.
    kept = checkpoints.set_aside(path)
    log.warning(
        f"refusing {exc}; falling back to an older checkpoint that verifies (the refused one is kept as {kept})"
    )


class Checkpointer:
    """Writes job checkpoints (one at a time, files finished in the background) and restores them.
    `cfg` is the job's config as started: what a run changes later (`JobOverride`) is none of
    what this reads, and a restore is handed the settings its ranks were built with."""

    def __init__(
        self,
        cfg: JobConfig,
        run_dir: RunDir,
        store: WeightStore,
        reporter: Reporter,
        checkpoints: CheckpointStore | None = None,
    ):
        self.cfg, self.run_dir, self.store, self.reporter = cfg, run_dir, store, reporter
        self.checkpoints = checkpoints or job_checkpoints(cfg)  # (`open_run`'s, when it opened the run)
        self._writing: asyncio.Task | None = None
        self._writing_version: int | None = None  # the version of the checkpoint being finished, if any

    def newest(self) -> Checkpoint | None:
        return newest(self.checkpoints)

    def kept_versions(self) -> list[int]:
        """The weight versions of the checkpoints kept and of the one being written (one retention
        removes meanwhile, or whose manifest does not read, is left out)."""
        versions = [] if self._writing_version is None else [self._writing_version]
        for path in self.checkpoints.list():
            try:
                versions.append(int(json.loads((path / MANIFEST).read_text())["version"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return versions

    def roll_back_to(self, step: int) -> Checkpoint | None:
        """The newest checkpoint of a step <= `step` that verifies (None: the start); every newer
        one belongs to the abandoned timeline and is set aside as `rolled-back-<name>`, never
        deleted, out of reach of a later resume."""
        for path in reversed(self.checkpoints.list()):
            if int(path.name.removeprefix("step-")) > step:
                kept = self.checkpoints.set_aside(path, "rolled-back")
                log.info(f"rollback: {path.name} is set aside as {kept.name}")
                continue
            try:
                return self.checkpoints.verify(path)
            except CheckpointError as exc:
                _refused(self.checkpoints, path, exc)
        return None

    def due(self, step: int, last: bool, verdict: GuardVerdict | None = None) -> bool:
        """Whether step `step` is checkpointed: every `checkpoint.every_steps`, the job's `last` (its
        final step, a stop, an early stop), and (`guardrails.keep_best`) an evaluation better than
        every earlier one."""
        best = verdict is not None and verdict.improved and self.cfg.guardrails.keep_best > 0
        return (step + 1) % self.cfg.checkpoint.every_steps == 0 or last or best

    def restore(
        self, ckpt: Checkpoint | None, trainer: Trainer, state: JobState, cfg: JobConfig
    ) -> tuple[int, Delivery]:
        """Put the ranks, the weight store and `state` (fresh) where `ckpt` left them, or at the
        start; publishes the weights the job continues from and returns their version and their
        delivery. `cfg` is the config the ranks were built with (faults.elastic
        may have shrunk the learner from this job's)."""
        if ckpt is None:
            self.store.discard_from(0)
            state.log.truncate(0)  # a rollback to the start: what the log holds belongs to the abandoned run
            delivery = trainer.publish_now(0)
            self.reporter.keep_steps(-1)
            return 0, delivery
        if trainer.critic is not None and "critic_rank_digests" not in ckpt.manifest:
            raise CheckpointError(f"checkpoint {ckpt.path}: has no critic state (written by a job without a critic)")
        saved_world = len(ckpt.manifest["rank_digests"])
        resharded = saved_world != cfg.learner.world_size
        if resharded and isinstance(cfg.learner.backend, DeepSpeedBackend):
            raise CheckpointError(
                f"checkpoint {ckpt.path}: written by {saved_world} DeepSpeed ranks, resumed with learner.world_size="
                f"{cfg.learner.world_size}; DeepSpeed ZeRO checkpoints resume at the world size they were written "
                f"with (set learner.world_size={saved_world}), FSDP2 ones at any"
            )
        digests = trainer.load_checkpoint(ckpt.path)
        for group, restored in digests.items():
            what = "critic" if group.startswith("critic") else "learner"
            if len(restored) != len(ckpt.manifest[group]):
                # Resharded (DCP): per-rank digests are not comparable; every file was checked by its checksum.
                log.info(f"{what}: resharded from {len(ckpt.manifest[group])} to {len(restored)} ranks")
            elif restored != ckpt.manifest[group]:
                raise CheckpointError(f"checkpoint {ckpt.path}: restored {what} state differs from the saved state")
        state.load(ckpt)
        # Versions after the checkpoint belong to the abandoned run; the checkpoint's is republished.
        self.store.discard_from(ckpt.version)
        delivery = trainer.publish_now(ckpt.version)
        self.reporter.keep_steps(ckpt.step)
        overrides = {name: {"checkpoint": old, "now": new} for name, (old, new) in state.overrides.items()}
        self.run_dir.write_json(
            RunDir.RESUME,
            {
                "step": ckpt.step,
                "version": ckpt.version,
                "path": str(ckpt.path),
                "rank_digests": digests["rank_digests"],
                "overrides": overrides,
                "scored_groups": state.recovered,
            },
        )
        log.info(
            f"resumed from {ckpt.path}: next step {state.start_step}, weight version {ckpt.version}; scored groups "
            f"after it reused {state.recovered['reused']} (from rolled-back weights: {state.recovered['rolled_back']})"
        )
        if overrides:
            log.info(
                "settings changed since the checkpoint, this job's apply: "
                + ", ".join(f"{k} {v['checkpoint']} -> {v['now']}" for k, v in overrides.items())
            )
        return ckpt.version, delivery

    async def save(
        self, tg: asyncio.TaskGroup, step: int, trainer: Trainer, state: JobState, verdict: GuardVerdict | None = None
    ) -> None:
        """Snapshot the state and stage every rank's state now; the files are finished in the
        background. `verdict`: the step's evaluation, the score best-k retention ranks it by."""
        await self.wait()  # one checkpoint at a time
        tmp = self.checkpoints.begin(step)
        try:
            state.save(step, tmp)  # flushes the scored log first: a full disk fails it with its groups kept pending
        except OSError as exc:
            self._failed(tmp, step, exc)
            return
        try:  # a rank that dies staging fails the checkpoint; the next step's call finds it dead and rebuilds
            digests: dict[str, object] = dict(await trainer.stage_checkpoint(tmp))  # the manifest's extra entries
        except ray.exceptions.RayError as exc:
            self._failed(tmp, step, exc)
            return
        if verdict is not None:
            digests = {**digests, "guard": {"metric": self.cfg.guardrails.metric, "value": verdict.value}}
        self._writing_version = step + 1
        self._writing = tg.create_task(self._finish(tmp, step, digests, trainer, state))

    async def wait(self) -> None:
        """Until the checkpoint being written (if any) is complete."""
        if self._writing is not None:
            await self._writing

    async def _finish(self, tmp: Path, step: int, digests: dict, trainer: Trainer, state: JobState) -> None:
        try:
            await trainer.wait_checkpoint()
            ckpt = await asyncio.to_thread(self.checkpoints.finalize, tmp, step, step + 1, digests)
            log.info(f"checkpoint {ckpt.path.name} (weight version {ckpt.version})")
            # Scored groups older than every kept checkpoint can never be recovered: drop them.
            if not self.cfg.train.record_rollouts:  # a recording keeps every group
                oldest = Checkpoint(self.checkpoints.list()[0], {}).driver_state()
                state.log.compact(oldest.get("scored_seq", 0))
        except (OSError, ray.exceptions.RayError) as exc:
            self._failed(tmp, step, exc)
        finally:
            self._writing_version = None

    def _failed(self, tmp: Path, step: int, exc: BaseException) -> None:
        # A full disk or a dying rank must not take the job down: the previous checkpoint stays.
        self.checkpoints.abandon(tmp)
        self.reporter.checkpoint_failed()
        log.warning(f"checkpoint after step {step} failed ({exc!r}); the previous checkpoint stays in use")


@dataclass
class LearnerStart:
    """What building the learner yields, for the slot to adopt."""

    trainer: Trainer
    override: JobOverride  # the job's settings from now on (faults.elastic may have shrunk the learner)
    state: JobState
    published_version: int
    delivery: Delivery  # the restored version's delivery, for every engine
    guard: EvalGuard


def build_learner(
    cfg: JobConfig,
    override: JobOverride,
    inputs: JobInputs,
    checkpointer: Checkpointer,
    run_dir: RunDir,
    ckpt: Checkpoint | None,
    previous: JobState | None,
) -> LearnerStart:
    """The rank groups and a job state from `ckpt` (or the start), its weights published, all
    with `cfg` (the job's config) as `override` has it (rollbacks' settings, an elastic shrink).
    `previous`: the job state being replaced (its samples' provenance carries over)."""
    trainer, override = start_trainer(cfg, override, inputs.model_path, inputs.probe)
    built = trainer.cfg  # the settings the ranks run (`override` applied): the job state and the restore use them too
    try:
        state = JobState(built, inputs.prompts)
        if previous is not None:
            state.worker_of = previous.worker_of  # provenance of samples the checkpoint's buffer holds
        version, delivery = checkpointer.restore(ckpt, trainer, state, built)
        guard = EvalGuard(built.guardrails)  # the evaluations of the steps the checkpoint keeps
        guard.replay(run_dir.read(RunDir.METRICS))
    except BaseException:
        trainer.kill()  # the ranks are nobody's yet
        raise
    return LearnerStart(trainer, override, state, version, delivery, guard)


class LearnerSlot:
    """The current learner (a rebuild replaces its parts) and the run's count of its restarts and
    rollbacks, which span rebuilds. `cfg` stays as the job started; `override` is what the run
    changed of it (rollbacks' settings, an elastic shrink)."""

    # Set by `adopt`; a failed start has none.
    trainer: Trainer  # the learner's rank groups
    state: JobState  # the job state the current learner was built with
    guard: EvalGuard  # the guardrails' evaluations, replayed up to the learner's checkpoint

    def __init__(
        self,
        cfg: JobConfig,
        inputs: JobInputs,
        checkpointer: Checkpointer,
        reporter: Reporter,
        weights: WeightSync,
        resume_from: Checkpoint | None,
    ):
        self.cfg, self.inputs, self.checkpointer, self.reporter = cfg, inputs, checkpointer, reporter
        self.run_dir = checkpointer.run_dir
        self.weights = weights  # every version's way to the engines: an adopted learner hands it its start and sender
        self.published_version = 0  # the newest version the learner has published (the driver moves it on)
        self.restarts = 0
        g = cfg.guardrails
        self.rollback = RollbackGuard(g.rollback, g.metric, g.higher_is_better)
        self.override = JobOverride()
        if resume_from is not None:  # the rollbacks the run made up to its checkpoint: counted, and their settings kept
            kept = [e for e in self.run_dir.read(RunDir.EVENTS) if e.get("step", -1) <= resume_from.step]
            self.override = self.rollback.replay(kept, cfg)

    @contextmanager
    def starting(self, resume_from: Checkpoint | None) -> Iterator[None]:
        """The learner's ranks start in a thread while the body starts the worker pools: each loads
        a model, and vLLM's engine start is the longest. Int8 engines start from the learner's int8
        variant of the job's version, so with int8 rollouts the body waits for the learner. The
        learner is waited for and adopted (its ranks are the job's to end) even when the body fails."""
        with ThreadPoolExecutor(1, thread_name_prefix="learner-start") as starter:
            learner = starter.submit(self._builder(), resume_from, None)
            try:
                if "int8" in self.cfg.generation.weight_variants:
                    self.adopt(learner.result())
                yield
            finally:
                started = learner.result()
                if not hasattr(self, "trainer"):
                    self.adopt(started)

    def adopt(self, start: LearnerStart) -> None:
        """The built learner becomes the job's, on the driver's thread."""
        # faults.elastic may have shrunk the learner (from now on: the checkpoint reshards).
        self.trainer, self.state, self.guard, self.override = start.trainer, start.state, start.guard, start.override
        self.published_version = start.published_version
        self.weights.adopt(start.delivery, start.trainer.send)  # pushed next: by `first`, or a rebuild's `restore`
        self.reporter.learner_ranks(start.trainer.cfg.learner.world_size)
        self.reporter.version(start.published_version)

    async def rebuild(self, ckpt: Checkpoint | None) -> None:
        """New rank groups (the critic's too) from `ckpt` (None: the start), adopted; the driver has
        killed the old ones."""
        self.adopt(await asyncio.to_thread(self._builder(), ckpt, self.state))

    async def after_death(self, cause: BaseException) -> Checkpoint | None:
        """A learner rank died: the checkpoint to rebuild from (the newest); once
        `faults.max_learner_restarts` are used up, a RuntimeError from `cause`."""
        if self.restarts >= self.cfg.faults.max_learner_restarts:
            raise RuntimeError(
                f"learner rank died and the {self.cfg.faults.max_learner_restarts} learner restarts are used up"
            ) from cause
        self.restarts += 1
        self.reporter.restart("learner", "group")
        self.run_dir.event("learner_rebuilt", cause=repr(cause)[:500])
        log.info(f"learner rank died ({cause!r}); rebuilding from the newest checkpoint")
        await self.checkpointer.wait()
        return self.checkpointer.newest()

    async def roll_back(self, step: int, reason: str) -> Checkpoint | None:
        """A guardrails condition held at `step`: the last good checkpoint to rebuild from, with
        settings adjusted (`RollbackGuard`; an error once its rollbacks are used up); later
        checkpoints are set aside."""
        self.override = self.rollback.adjusted(self.override, self.cfg, reason)
        await self.checkpointer.wait()
        return self.checkpointer.roll_back_to(self.rollback.last_good_step(step, reason))

    def _builder(self) -> Callable[[Checkpoint | None, JobState | None], LearnerStart]:
        """`build_learner(checkpoint, previous state)` with the settings as they are now, for a worker
        thread (which reads nothing of the slot that the driver's thread may change meanwhile)."""
        return partial(build_learner, self.cfg, self.override, self.inputs, self.checkpointer, self.run_dir)
