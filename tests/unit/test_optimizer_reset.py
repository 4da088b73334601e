"""ProRL's optimizer reset with the reference's (`algorithm.kl.reference_refresh.reset_optimizer`):
at each refresh step the policy's optimizer state is cleared after the update, so the next update
is a first one (AdamW's step count 1) from the weights as they are; a checkpoint taken then keeps
no state either, and a learner resumed from it steps exactly as the reset one. Real one-rank
FSDP2 learners."""

from __future__ import annotations

import pytest
import torch

from rlhf_cluster.config import JobConfig
from rlhf_cluster.job.preflight import CONFIG_RULES
from rlhf_cluster.learner.fsdp2 import FSDP2Learner
from rlhf_cluster.learner.spec import LearnerSpec
from tests.batches import full_params, ragged_batch


def test_a_reset_optimizer_steps_as_a_fresh_one_and_checkpoints_so(gloo_group, tiny_model_path, tmp_path):
    cfg = JobConfig.model_validate({"learner": {"world_size": 1, "lr": 1e-3}, "train": {"total_steps": 4}})
    spec = LearnerSpec.of_policy(cfg)
    for folder in ("learner", "rng"):
        (tmp_path / folder).mkdir()
    first, then = ragged_batch([(3, 2), (4, 3)], seed=0), ragged_batch([(2, 4), (5, 2)], seed=1)
    reset = FSDP2Learner(spec, tiny_model_path)
    reset.train_step(first, kl_coef=0.0)
    assert reset.optimizer.state and reset.updates == 1
    reset.reset_optimizer()
    assert not reset.optimizer.state and reset.updates == 0 and reset.step == 1  # the schedule and step go on
    future, saved = reset.save_checkpoint(tmp_path)
    future.result()
    assert not reset.optimizer.state  # the checkpoint made none up
    resumed = FSDP2Learner(spec, tiny_model_path)
    assert resumed.load_checkpoint(tmp_path) == saved and not resumed.optimizer.state
    kept = FSDP2Learner(spec, tiny_model_path)  # the same first step, its optimizer kept
    kept.train_step(first, kl_coef=0.0)
    for learner in (reset, resumed, kept):
        learner.train_step(then, kl_coef=0.0)
    steps = {int(state["step"]) for state in reset.optimizer.state.values()}
    assert steps == {1}  # AdamW's count restarted
    after = full_params(reset)
    assert all(torch.equal(after[k], v) for k, v in full_params(resumed).items())
    assert any(not torch.equal(after[k], v) for k, v in full_params(kept).items())  # the reset changed the update


def test_which_steps_reset_and_where_it_is_refused(job_config):
    refresh = {"every_steps": 3, "reset_optimizer": True}
    cfg = job_config(reference=True, algorithm={"kl": {"coef": 0.01, "reference_refresh": refresh}})
    assert [v for v in range(1, 10) if cfg.resets_optimizer(v)] == [3, 6, 9]
    plain = job_config(reference=True, algorithm={"kl": {"coef": 0.01, "reference_refresh": {"every_steps": 3}}})
    assert not any(plain.resets_optimizer(v) for v in range(1, 10))
    deepspeed = job_config(
        reference=True,
        algorithm={"kl": {"coef": 0.01, "reference_refresh": refresh}},
        learner={"backend": {"type": "deepspeed"}},
    )
    problems = [p for rule in CONFIG_RULES for p in rule(deepspeed)]
    assert any("reset_optimizer with learner.backend deepspeed" in p for p in problems), problems
    with pytest.raises(ValueError):
        job_config(reference=True, algorithm={"kl": {"coef": 0.01, "reference_refresh": {"every_steps": 3,
                                                                                           "reset_optimizer": 1.5}}})
