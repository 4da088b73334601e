"""Elastic learner: the world size a rebuilt learner continues at when not all its ranks can be
placed. Ray-free: the actors count what can be placed, this decides what to run."""

from __future__ import annotations

from rlhf_cluster.config import JobConfig
from rlhf_cluster.job.preflight import batch_splits


class ElasticError(RuntimeError):
    """No smaller learner world size can continue the job."""


def shrunk_learner(cfg: JobConfig, placeable: int) -> JobConfig:
    """`cfg` with the largest `learner.world_size` below the configured one and at most `placeable`
    over which the step batch still splits evenly (the rules the job started under).

    FSDP2 checkpoints reshard to any world size; DeepSpeed ZeRO ones do not (preflight refuses
    `faults.elastic` with DeepSpeed).
    """
    configured = cfg.learner.world_size
    for world in range(min(placeable, configured - 1), 0, -1):
        candidate = cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"world_size": world})})
        if not batch_splits(candidate):
            return candidate
    raise ElasticError(
        f"learner: {placeable} of learner.world_size={configured} ranks can be placed, and the step batch "
        f"(train.prompts_per_step * generation.sampling.n = {cfg.samples_per_step}) splits evenly over no smaller "
        "world size that fits"
    )
