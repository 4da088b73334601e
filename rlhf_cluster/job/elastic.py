"""Elastic learner: the world size a rebuilt learner continues at when not all its ranks can be
placed, as a `JobOverride`. Ray-free: the actors count what can be placed, this decides what to run."""

from __future__ import annotations

from rlhf_cluster.config import JobConfig
from rlhf_cluster.job.override import JobOverride
from rlhf_cluster.job.preflight import batch_splits


class ElasticError(RuntimeError):
    """No smaller learner world size can continue the job."""


def shrunk_learner(cfg: JobConfig, override: JobOverride, placeable: int) -> JobOverride:
    """`override` (of `cfg`, the job's config) with the largest `learner.world_size` below the one
    it runs now and at most `placeable` over which the step batch still splits evenly (the rules
    the job started under) and which `learner.sequence_parallel` divides (its groups of ranks).

    FSDP2 checkpoints reshard to any world size; DeepSpeed ZeRO ones do not (preflight refuses
    `faults.elastic` with DeepSpeed).
    """
    now = override.apply(cfg)
    configured, group = now.learner.world_size, now.learner.sequence_parallel
    for world in range(min(placeable, configured - 1), 0, -1):
        if world % group:
            continue  # model_copy skips the config's validators: the sequence-parallel groups must fit
        candidate = now.model_copy(update={"learner": now.learner.model_copy(update={"world_size": world})})
        if not batch_splits(candidate):
            return override.with_learner_world_size(world)
    raise ElasticError(
        f"learner: {placeable} of learner.world_size={configured} ranks can be placed, and the step batch "
        f"(train.prompts_per_step * generation.sampling.n = {now.samples_per_step}) splits evenly over no smaller "
        f"world size that fits{_groups(group)}"
    )


def _groups(group: int) -> str:
    """What the world size must also be with sequence-parallel groups of `group` ranks."""
    return f" and is a multiple of learner.sequence_parallel={group}" if group > 1 else ""
