"""The one learning-rate schedule every optimizer in the project uses (`learner/schedule.py`)."""

from __future__ import annotations

import math

import pytest

from rlhf_cluster.learner.schedule import lr_multiplier


def test_constant_after_linear_warmup():
    assert [lr_multiplier(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_multiplier(0) == lr_multiplier(10**6) == 1.0


def test_cosine_falls_from_peak_to_the_floor_at_the_last_step():
    total, warmup, floor = 100, 10, 0.1
    values = [lr_multiplier(s, warmup, total, "cosine", floor) for s in range(total)]
    assert values[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    after = values[warmup:]
    assert after[0] == pytest.approx(1.0) and after[-1] == pytest.approx(floor)
    assert all(a >= b for a, b in zip(after, after[1:]))  # never rises again
    middle = warmup + (total - 1 - warmup) / 2
    assert lr_multiplier(int(middle), warmup, total, "cosine", 0.0) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * (int(middle) - warmup) / (total - 1 - warmup))))
    assert lr_multiplier(total + 5, warmup, total, "cosine", floor) == pytest.approx(floor)  # past the end: the floor


def test_linear_falls_in_equal_steps_to_the_floor():
    values = [lr_multiplier(s, 1, 6, "linear", 0.2) for s in range(8)]
    assert values == pytest.approx([1.0, 1.0, 0.8, 0.6, 0.4, 0.2, 0.2, 0.2])


def test_bad_schedule_names_itself():
    with pytest.raises(ValueError, match="'step'"):
        lr_multiplier(5, 0, 10, "step")
    with pytest.raises(ValueError, match="total_steps"):
        lr_multiplier(5, 0, None, "cosine")


def test_the_rl_learner_decays_its_lr_over_the_jobs_steps(gloo_group, tiny_model_path):
    """Found comparing with veRL and OpenRLHF (cosine with a floor): the RL learner warmed up and then
    held `lr`; `learner.lr_schedule` now decays it to `lr * min_lr_ratio` at `train.total_steps`, on a
    real one-rank FSDP2 learner (its reported `learner/lr` is the next step's)."""
    from rlhf_cluster.config import JobConfig
    from rlhf_cluster.learner.fsdp2 import FSDP2Learner
    from rlhf_cluster.learner.spec import LearnerSpec
    from tests.batches import ragged_batch

    cfg = JobConfig.model_validate({
        "learner": {"world_size": 1, "lr": 1e-3, "lr_warmup_steps": 1, "lr_schedule": "cosine", "min_lr_ratio": 0.1},
        "train": {"total_steps": 4},
    })
    learner = FSDP2Learner(LearnerSpec.of_policy(cfg), tiny_model_path)
    batch = ragged_batch([(3, 2), (4, 3)], seed=0)
    lrs = [learner.train_step(batch, kl_coef=0.0)["learner/lr"] for _ in range(4)]
    assert lrs == pytest.approx([1e-3 * f for f in (1.0, 0.55, 0.1, 0.1)])
