"""Learner maths: KL, advantages, RL/SFT/reward-model losses and train/inference mismatch correction.

The names below load on first use (PEP 562 `__getattr__`): `rlhf_cluster.config` imports
`algorithms.presets` (plain data), and reading a config (the CLI, `--dry-run`) must not pay for
importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ESTIMATORS": "advantages",
    "broadcast_to_tokens": "advantages",
    "distillation_advantages": "distillation",
    "dr_grpo_advantages": "advantages",
    "estimator": "advantages",
    "filled_at_take_time": "advantages",
    "gae": "advantages",
    "group_advantages": "advantages",
    "grpo_advantages": "advantages",
    "reinforce_pp_advantages": "advantages",
    "rloo_advantages": "advantages",
    "turn_level_advantages": "advantages",
    "whiten": "advantages",
    "importance_weights": "correction",
    "AdaptiveKLController": "kl",
    "FixedKLController": "kl",
    "kl_penalty": "kl",
    "bradley_terry_loss": "losses",
    "entropy": "losses",
    "entropy_from_logits": "losses",
    "kl_loss": "losses",
    "masked_mean": "losses",
    "masked_sum": "losses",
    "policy_loss": "losses",
    "sft_loss": "losses",
    "value_loss": "losses",
    "PRESETS": "presets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
