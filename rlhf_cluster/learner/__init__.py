"""The policy learner: FSDP2 or DeepSpeed ZeRO ranks sharing one RL train step (`base.LearnerBase`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlhf_cluster.learner.base import LearnerBase
    from rlhf_cluster.learner.spec import LearnerSpec


def create_learner(spec: LearnerSpec, model_path: str) -> LearnerBase:
    """This rank's policy learner for `spec.learner.backend.type`, built from its spec (the job's
    `learner` and `algorithm` sections and the sampling values it needs); deepspeed is imported
    only when chosen."""
    from rlhf_cluster.config import DeepSpeedBackend

    if isinstance(spec.learner.backend, DeepSpeedBackend):
        from rlhf_cluster.learner.deepspeed import DeepSpeedLearner

        return DeepSpeedLearner(spec, model_path)
    from rlhf_cluster.learner.fsdp2 import FSDP2Learner

    return FSDP2Learner(spec, model_path)
