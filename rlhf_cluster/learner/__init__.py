"""The policy learner: FSDP2 or DeepSpeed ZeRO ranks sharing one RL train step (`base.LearnerBase`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlhf_cluster.config import JobConfig
    from rlhf_cluster.learner.base import LearnerBase


def create_learner(cfg: "JobConfig", model_path: str) -> "LearnerBase":
    """This rank's learner for `cfg.learner.backend.type`; deepspeed is imported only when chosen."""
    from rlhf_cluster.config import DeepSpeedBackend

    if isinstance(cfg.learner.backend, DeepSpeedBackend):
        from rlhf_cluster.learner.deepspeed import DeepSpeedLearner

        return DeepSpeedLearner(cfg, model_path)
    from rlhf_cluster.learner.fsdp2 import FSDP2Learner

    return FSDP2Learner(cfg, model_path)
