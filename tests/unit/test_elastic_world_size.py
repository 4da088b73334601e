"""Which world size an elastic learner continues at."""

from __future__ import annotations

import pytest

from rlhf_cluster.config import ConfigError, JobConfig
from rlhf_cluster.job.elastic import ElasticError, shrunk_learner
from rlhf_cluster.job.override import JobOverride
from rlhf_cluster.job.preflight import preflight


def _cfg(world: int, prompts: int = 4, n: int = 4, **learner) -> JobConfig:
    return JobConfig.model_validate({
        "learner": {"world_size": world, **learner},
        "train": {"prompts_per_step": prompts},
        "generation": {"sampling": {"n": n}},
        "faults": {"elastic": True},
    })


@pytest.mark.parametrize("world, placeable, prompts, n, expected", [
    (4, 3, 4, 4, 2),  # 16 samples: 3 ranks would split unevenly, 2 do
    (4, 1, 4, 4, 1),
    (8, 100, 4, 4, 4),  # never above the configured size minus one (it could not be placed)
    (3, 2, 3, 2, 2),  # 6 samples over 2
    (3, 2, 3, 3, 1),  # 9 samples: 2 would split unevenly
])
def test_largest_smaller_world_size_the_batch_splits_over(world, placeable, prompts, n, expected):
    cfg = _cfg(world, prompts, n)
    override = shrunk_learner(cfg, JobOverride(lr=1e-5), placeable)
    assert override == JobOverride(lr=1e-5, learner_world_size=expected)  # a rollback's lr is kept
    smaller = override.apply(cfg)
    assert smaller.learner.world_size == expected and smaller.learner.lr == 1e-5
    assert smaller.train == cfg.train and cfg.learner.world_size == world  # the rest kept, cfg untouched


def test_no_rank_placeable_is_an_error_naming_the_counts():
    with pytest.raises(ElasticError, match="0 of learner.world_size=2"):
        shrunk_learner(_cfg(2), JobOverride(), 0)


def test_a_learner_shrunk_before_shrinks_from_its_size_now():
    cfg = _cfg(4)
    assert shrunk_learner(cfg, JobOverride(learner_world_size=2), 2).learner_world_size == 1


def test_elastic_with_deepspeed_is_refused_by_preflight():
    cfg = _cfg(2, backend="deepspeed")
    with pytest.raises(ConfigError, match="faults.elastic needs learner.backend=fsdp2"):
        preflight(cfg, files=False)


def test_a_sequence_parallel_learner_shrinks_to_whole_groups_only():
    """model_copy runs no validator: world 3 with groups of 2 would fail only at the ranks' start."""
    cfg = _cfg(4, sequence_parallel=2)
    assert shrunk_learner(cfg, JobOverride(), 3).learner_world_size == 2
    with pytest.raises(ElasticError, match=r"multiple of learner\.sequence_parallel=2"):
        shrunk_learner(cfg, JobOverride(), 1)
    with pytest.raises(ValueError, match=r"learner\.world_size=3 is not a multiple of learner\.sequence_parallel=2"):
        JobOverride(learner_world_size=3).apply(cfg)
