"""What a running job changed of its own settings: the job's `JobConfig` stays as it was started,
and the changes ride beside it as one typed record.

Two things change a job's settings after its start: a guardrails rollback (`RollbackGuard`:
`learner.lr` and `algorithm.kl.coef` scaled, replayed from the run's events on resume) and
`faults.elastic` (`shrunk_learner`: fewer learner ranks when not all can be placed). The driver
holds a `JobOverride` and applies it where those values are read: building the learner (its
ranks, the job state, the checkpoint's restore) and reporting a rollback.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from rlhf_cluster.config import JobConfig


@dataclass(frozen=True)
class JobOverride:
    """Settings that differ from the job's config, each None while it is as configured:
    `lr` (learner.lr) and `kl_coef` (algorithm.kl.coef) after rollbacks, `learner_world_size`
    (learner.world_size) after an elastic shrink."""

    lr: float | None = None
    kl_coef: float | None = None
    learner_world_size: int | None = None

    def apply(self, cfg: JobConfig) -> JobConfig:
        """`cfg` (the job's, as started) with these settings: what a learner is built with. A
        new record; `cfg` itself is never changed, and with nothing overridden it is `cfg`."""
        learner = {k: v for k, v in (("lr", self.lr), ("world_size", self.learner_world_size)) if v is not None}
        update: dict[str, object] = {}
        if learner:
            changed = update["learner"] = cfg.learner.model_copy(update=learner)
            # model_copy runs no validator: the one rule a smaller world size can break, checked here.
            if changed.world_size % changed.sequence_parallel:
                raise ValueError(
                    f"learner.world_size={changed.world_size} is not a multiple of "
                    f"learner.sequence_parallel={changed.sequence_parallel} (its sequence-parallel groups)"
                )
        if self.kl_coef is not None:
            kl = cfg.algorithm.kl.model_copy(update={"coef": self.kl_coef})
            update["algorithm"] = cfg.algorithm.model_copy(update={"kl": kl})
        return cfg.model_copy(update=update) if update else cfg

    def with_learner_world_size(self, world_size: int) -> JobOverride:
        return replace(self, learner_world_size=world_size)

    def with_rollback(self, lr: float, kl_coef: float) -> JobOverride:
        return replace(self, lr=lr, kl_coef=kl_coef)
