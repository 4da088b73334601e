"""Keeping a run going and honest: how it reacts to failures (`faults`), its checkpoints
(`checkpoint`), and what it does on its evaluations and step rows (`guardrails`: best-k, early
stop, rollbacks)."""

from __future__ import annotations

from pydantic import Field

from rlhf_cluster.config.base import _Strict


class FaultsConfig(_Strict):
    """How the job reacts to failures."""

    max_worker_restarts: int = Field(
        3, ge=0, description="Restarts allowed per pool (generation, reward, reference) over the job."
    )
    restart_backoff_s: float = Field(
        1.0, ge=0, description="Wait before the first restart; doubles with each restart of a pool."
    )
    max_learner_restarts: int = Field(
        2, ge=0, description="Times the learner group is rebuilt from the newest checkpoint after a rank dies."
    )
    max_bad_steps: int = Field(
        3, ge=1, description="Consecutive steps with a NaN/inf loss (skipped) before the job stops."
    )
    heartbeat_interval_s: float = Field(
        5.0, gt=0, description="Every worker of every pool is sent a heartbeat this often."
    )
    heartbeat_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A worker that has not answered a heartbeat within this is hung (e.g. SIGSTOP): killed and "
        "replaced.",
    )
    stall_timeout_s: float = Field(
        60.0,
        gt=0,
        description="A generation worker whose engine has requests running but takes no step for this long is hung.",
    )
    collective_timeout_s: float = Field(
        300.0,
        gt=0,
        description="A torch.distributed collective that waits this long for a peer rank fails (no silent hang).",
    )
    preempt_grace_s: float = Field(
        120.0,
        gt=0,
        description="After SIGTERM/SIGINT, seconds to finish the step in progress and write a checkpoint "
        "before the job is torn down without one.",
    )
    elastic: bool = Field(
        False,
        description="When the learner is built (at the start, on resume, or rebuilt after a rank died or "
        "hung) and its learner.world_size ranks cannot all be placed (a node is gone), continue on the most ranks that "
        "can be (the checkpoint is resharded; the batch must split evenly over them). FSDP2 only.",
    )
    elastic_wait_s: float = Field(
        30.0,
        gt=0,
        description="With `elastic`, how long a rebuilt learner waits for all its ranks to be placed "
        "before it continues on fewer.",
    )
    progress_timeout_s: float = Field(
        3600.0,
        gt=0,
        description="Ceiling of the no-progress watchdog: a step loop that has waited this long for its "
        "batch fails the job with why (groups dropped and for what, the buffer, requests in flight) instead of "
        "spinning. Before the first step this is the bound; after, the bound is progress_timeout_factor x the "
        "slowest recent step, at least 600 s and at most this.",
    )
    progress_timeout_factor: float = Field(
        10.0,
        ge=1,
        description="The no-progress watchdog's bound in multiples of the slowest of the last 20 steps "
        "(wait for the batch included), between 600 s and progress_timeout_s.",
    )


class CheckpointConfig(_Strict):
    """Learner + driver checkpoints for exact resume."""

    dir: str | None = Field(None, description="Checkpoint directory (default: RUN_DIR/checkpoints).")
    every_steps: int = Field(10, ge=1, description="Checkpoint after every N learner steps (and after the last one).")
    keep: int = Field(3, ge=1, description="Newest complete checkpoints kept.")


class RollbackConfig(_Strict):
    """Conditions that roll a run back to its last good checkpoint, with adjusted settings
    (`guardrails.rollback`; every condition unset: off)."""

    kl_above: float | None = Field(None, gt=0, description="A step's KL to the reference (`kl`) above this.")
    mismatch_above: float | None = Field(
        None, gt=0, description="A step's engine/learner mismatch (`correction/mismatch_k3`) above this."
    )
    entropy_below: float | None = Field(None, gt=0, description="A step's policy entropy below this (collapse).")
    response_length_above: float | None = Field(
        None, gt=0, description="A step's mean response length above this many tokens (runaway)."
    )
    eval_drop: float | None = Field(
        None, gt=0, description="An evaluation's guardrails.metric this far worse than the best so far."
    )
    max_rollbacks: int = Field(
        2, ge=1, description="Rollbacks allowed over the run; one more condition ends it with an error."
    )
    lr_factor: float = Field(0.5, gt=0, le=1, description="Each rollback multiplies learner.lr by this.")
    kl_coef_factor: float = Field(2.0, ge=1, description="Each rollback multiplies algorithm.kl.coef (beta) by this.")

    @property
    def active(self) -> bool:
        return any(
            getattr(self, name) is not None
            for name in ("kl_above", "mismatch_above", "entropy_below", "response_length_above", "eval_drop")
        )


class GuardrailsConfig(_Strict):
    """Actions on the periodic evaluation (`data.eval_every_steps`): keep the best checkpoints by an
    eval metric, and stop early when it stops improving or reaches a target (`rlhf_cluster.job.guardrails`)."""

    metric: str = Field(
        "eval_accuracy",
        description="The evaluation's column watched: eval_accuracy, eval_sampled_accuracy, "
        "eval_reward_mean, eval_sampled_reward_mean, eval_pass@<k> (k in data.eval_pass_k) or "
        "eval_accuracy/<source> (the accuracies need a reward that says which answers are right: a "
        "`correct` or verl's `acc` component).",
    )
    higher_is_better: bool = Field(True, description="False: the metric improves as it falls.")
    min_delta: float = Field(0.0, ge=0.0, description="An evaluation improves on the best only by more than this.")
    keep_best: int = Field(
        0,
        ge=0,
        description="Also keep the k checkpoints with the best metric, besides the checkpoint.keep newest; an "
        "evaluation that improves on the best so far is checkpointed at once. 0: off.",
    )
    patience: int | None = Field(
        None, ge=1, description="Stop (checkpointed, evaluated) after this many evaluations without improvement."
    )
    target: float | None = Field(None, description="Stop (checkpointed, evaluated) once the metric reaches this value.")
    rollback: RollbackConfig = Field(default_factory=RollbackConfig, description="Automatic rollback conditions.")

    @property
    def active(self) -> bool:
        """Whether anything acts on the periodic evaluation."""
        return (
            bool(self.keep_best)
            or self.patience is not None
            or self.target is not None
            or self.rollback.eval_drop is not None
        )
