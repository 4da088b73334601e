"""Learner maths: KL, advantages, RL/SFT/reward-model losses and train/inference mismatch correction."""

from .advantages import broadcast_to_tokens, gae, group_advantages, reinforce_pp_advantages, rloo_advantages, whiten
from .correction import importance_weights
from .kl import AdaptiveKLController, FixedKLController, kl_penalty
from .losses import (
    bradley_terry_loss,
    entropy,
    entropy_from_logits,
    kl_loss,
    masked_mean,
    masked_sum,
    policy_loss,
    sft_loss,
    value_loss,
)

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "bradley_terry_loss",
    "broadcast_to_tokens",
    "entropy",
    "entropy_from_logits",
    "gae",
    "group_advantages",
    "importance_weights",
    "kl_loss",
    "kl_penalty",
    "masked_mean",
    "masked_sum",
    "policy_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "sft_loss",
    "value_loss",
    "whiten",
]
