"""Building the learner from a checkpoint: the rank groups, a fresh job state restored beside
them and the weights they continue from. Blocking work, done in a worker thread at a job's start
and at every rebuild; it returns a `LearnerStart` that the driver adopts on its own thread, so no
thread assigns the driver's state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from actors.trainer import Trainer, start_trainer
from rlhf_cluster.config import JobConfig
from rlhf_cluster.job.guardrails import EvalGuard
from rlhf_cluster.job.inputs import JobInputs
from rlhf_cluster.run.checkpoint import Checkpoint
from rlhf_cluster.run.job_state import JobState
from rlhf_cluster.run.run_dir import RunDir

if TYPE_CHECKING:
    from actors.checkpointer import Checkpointer


@dataclass
class LearnerStart:
    """What building the learner yields, for the driver to adopt."""

    trainer: Trainer
    cfg: JobConfig  # the job's config from now on (faults.elastic may have shrunk the learner)
    state: JobState
    published_version: int
    delivery: dict  # the restored version's delivery, for every engine
    guard: EvalGuard


def build_learner(
    cfg: JobConfig,
    cfg_dict: dict,
    inputs: JobInputs,
    checkpointer: Checkpointer,
    run_dir: RunDir,
    ckpt: Checkpoint | None,
    previous: JobState | None,
) -> LearnerStart:
    """The rank groups and a job state from `ckpt` (or the start), its weights published.
    `previous`: the job state being replaced (its samples' provenance carries over)."""
    trainer, cfg = start_trainer(cfg, cfg_dict, inputs.model_path, inputs.probe)
    try:
        state = JobState(cfg, inputs.prompts)
        if previous is not None:
            state.worker_of = previous.worker_of  # provenance of samples the checkpoint's buffer holds
        version, delivery = checkpointer.restore(ckpt, trainer, state, cfg)
        guard = EvalGuard(cfg.guardrails)  # the evaluations of the steps the checkpoint keeps
        guard.replay(run_dir.read(RunDir.METRICS))
    except BaseException:
        trainer.kill()  # the ranks are nobody's yet
        raise
    return LearnerStart(trainer, cfg, state, version, delivery, guard)
