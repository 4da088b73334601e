"""A checkpoint taken while a critic warm-up holds the policy (`critic.freeze_policy_steps`: the
policy's learner has taken no step) leaves its optimizer as if none was taken, on a real one-rank
FSDP2 learner. torch's `get_state_dict` (checkpoint and digest) gives an optimizer without state
one by a zero-gradient step at lr 0: AdamW's step count 1 with zero moments, which made the first
real update ~0.74x its size and the run depend on where `checkpoint_every` fell."""

from __future__ import annotations

import torch

from rlhf_cluster.config import JobConfig
from rlhf_cluster.learner.fsdp2 import FSDP2Learner
from rlhf_cluster.learner.spec import LearnerSpec
from tests.batches import full_params, ragged_batch


def test_a_checkpoint_before_the_first_step_leaves_the_first_update_as_it_was(gloo_group, tiny_model_path, tmp_path):
    cfg = JobConfig.model_validate({"learner": {"world_size": 1, "lr": 1e-3}, "train": {"total_steps": 4}})
    spec = LearnerSpec.of_policy(cfg)
    for folder in ("learner", "rng"):
        (tmp_path / folder).mkdir()
    held = FSDP2Learner(spec, tiny_model_path)  # checkpointed during the warm-up, then trains
    future, saved = held.save_checkpoint(tmp_path)
    future.result()
    assert not held.optimizer.state and held.state_digest() == saved  # a digest makes up no state either
    plain = FSDP2Learner(spec, tiny_model_path)  # never checkpointed
    initial = full_params(plain)
    resumed = FSDP2Learner(spec, tiny_model_path)
    assert resumed.load_checkpoint(tmp_path) == saved and not resumed.optimizer.state
    batch = ragged_batch([(3, 2), (4, 3)], seed=0)
    for learner in (held, plain, resumed):
        learner.train_step(batch, kl_coef=0.0)
    expected = full_params(plain)
    assert any(not torch.equal(expected[k], v) for k, v in initial.items())  # the step trained
    for learner in (held, resumed):
        assert all(torch.equal(expected[k], v) for k, v in full_params(learner).items())
        assert learner.state_digest() == plain.state_digest()


def test_a_checkpoint_after_only_skipped_updates_leaves_the_first_update_as_it_was(
    gloo_group, tiny_model_path, tmp_path
):
    """A policy whose updates a non-finite loss has skipped so far has steps but no optimizer
    state: a checkpoint then must not make one up either (it keyed on the step count before)."""
    cfg = JobConfig.model_validate({"learner": {"world_size": 1, "lr": 1e-3}, "train": {"total_steps": 4}})
    spec = LearnerSpec.of_policy(cfg)
    for folder in ("learner", "rng"):
        (tmp_path / folder).mkdir()
    broken = ragged_batch([(3, 2), (4, 3)], seed=1)
    broken.advantages.fill_(float("nan"))
    skipped, plain = FSDP2Learner(spec, tiny_model_path), FSDP2Learner(spec, tiny_model_path)
    for learner in (skipped, plain):
        assert learner.train_step(broken, kl_coef=0.0)["learner/skipped_updates"] == 1
        assert learner.step == 1 and learner.updates == 0 and not learner.optimizer.state
    future, saved = skipped.save_checkpoint(tmp_path)
    future.result()
    assert not skipped.optimizer.state
    resumed = FSDP2Learner(spec, tiny_model_path)
    assert resumed.load_checkpoint(tmp_path) == saved and resumed.step == 1 and not resumed.optimizer.state
    batch = ragged_batch([(3, 2), (4, 3)], seed=0)
    for learner in (skipped, plain, resumed):
        learner.train_step(batch, kl_coef=0.0)
        assert learner.updates == 1
    expected = full_params(plain)
    for learner in (skipped, resumed):
        assert all(torch.equal(expected[k], v) for k, v in full_params(learner).items())
