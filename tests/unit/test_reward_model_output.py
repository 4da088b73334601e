"""The reward model's forward returns new tensors, never views: FSDP2 registers its pre-backward
hook on the wrapped model's outputs, and warns ("FSDP2-wrapped module (FSDPRewardModel) returned a
view tensor") because an in-place op on a view would drop that hook and the gradients with it.
`train-rm` printed that warning twice before the scores were copied out of the head's output."""

from __future__ import annotations

import warnings

import torch
from transformers import AutoTokenizer

from rlhf_cluster.models.scalar_head import RewardModel


def _batch():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 10, 11]])
    return ids, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])


def test_scores_and_lm_logits_are_not_views(tiny_model_path):
    ids, mask = _batch()
    scores = RewardModel.from_lm(tiny_model_path)(ids, mask)
    assert scores.shape == (2,) and scores.dtype == torch.float32 and scores.requires_grad
    assert scores._base is None
    scores, logits = RewardModel.from_lm(tiny_model_path, keep_lm_head=True)(ids, mask, lm_rows=1)
    assert scores._base is None and logits._base is None
    bf16 = RewardModel.from_lm(tiny_model_path, dtype=torch.bfloat16)(ids, mask)
    assert bf16.dtype == torch.float32 and bf16._base is None


def test_an_fsdp2_reward_model_step_warns_of_no_view_output(gloo_group, tiny_model_path):
    """One real CPU FSDP2 step of the reward-model trainer (as `train-rm` runs it): no view warning,
    and the step's gradient is there."""
    from rlhf_cluster.config import StageConfig
    from rlhf_cluster.learner.supervised import SupervisedTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    chosen = [tok("3+4=7")["input_ids"], tok("9+9=18")["input_ids"]]
    rejected = [tok("3+4=8")["input_ids"], tok("9+9=17")["input_ids"]]
    trainer = SupervisedTrainer("reward_model", tiny_model_path, StageConfig(lr=1e-3, seed=0), tok.pad_token_id)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = trainer.rm_step(chosen, rejected, [0.0, 0.0])
    views = [str(w.message) for w in caught if "returned a view tensor" in str(w.message)]
    assert views == []
    assert step["grad_norm"] > 0
