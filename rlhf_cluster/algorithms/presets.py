"""Algorithm presets: `algorithm.preset: NAME` fills the `algorithm` section with these values.

Each preset is a partial `algorithm` section (nested dicts, the YAML shape). Fields written next
to the preset in a job config override it, key by key (`merge_preset`). Adding a preset is one
entry here: `AlgorithmConfig.preset` accepts exactly the names of `PRESETS`, and
tests/integration/test_presets.py runs every entry.

Plain data only: `rlhf_cluster.config` imports this module, and reading a config must not import
torch.
"""

from __future__ import annotations

# KL settings shared by several presets.
_NO_KL = {"placement": "none", "coef": 0.0}
_KL_IN_REWARD = {"placement": "reward", "estimator": "k1", "coef": 0.01}

PRESETS: dict[str, dict] = {
    # Group-normalised advantages, per-sequence token mean, k3 KL in the loss (DeepSeekMath).
    "grpo": {
        "advantage": "grpo",
        "loss": {"aggregation": "sequence_mean"},
        "kl": {"placement": "loss", "estimator": "k3", "coef": 0.04},
    },
    # No std division and a constant denominator remove GRPO's length and difficulty biases.
    "dr_grpo": {
        "advantage": "dr_grpo",
        "loss": {"aggregation": "sequence_sum_norm"},
        "kl": _NO_KL,
    },
    # Clip-higher, token-level loss, no KL, overlong filtering/punishment, dynamic sampling. The
    # soft punishment covers the last fifth of max_new_tokens (DAPO: 4096 of 20480 tokens), so it
    # scales with the job's limit; an explicit shaping.overlong_buffer (tokens) overrides it.
    "dapo": {
        "advantage": "grpo",
        "loss": {"clip_low": 0.2, "clip_high": 0.28, "aggregation": "token_mean"},
        "kl": _NO_KL,
        "shaping": {
            "overlong_buffer_fraction": 0.2,
            "overlong_penalty": 1.0,
            "overlong_filter": True,
            "dynamic_sampling": True,
            "dynamic_sampling_metric": "task_reward",  # DAPO's accuracy: the penalties are no group signal
        },
    },
    # CISPO (MiniMax-M1): the importance weight clamped and detached, every token's gradient kept; one-sided,
    # [0, 4], as Tinker's CISPO defaults (the paper tunes only the upper bound).
    "cispo": {
        "advantage": "grpo",
        "loss": {"mode": "cispo", "clip_low": 1.0, "clip_high": 3.0, "aggregation": "token_mean"},
        "kl": _NO_KL,
    },
    # Sequence-level, length-normalised ratio with one (tight) clip per sequence.
    "gspo": {
        "advantage": "grpo",
        "loss": {"ratio_level": "sequence", "clip_low": 3e-4, "clip_high": 4e-4, "aggregation": "sequence_mean"},
        "kl": _NO_KL,
    },
    # Leave-one-out baseline, KL in the reward.
    "rloo": {
        "advantage": "rloo",
        "loss": {"aggregation": "token_mean"},
        "kl": _KL_IN_REWARD,
    },
    # Per-token KL in the reward, return-to-go whitened over the whole batch.
    "reinforce_pp": {
        "advantage": "reinforce_pp",
        "loss": {"aggregation": "token_mean"},
        "kl": _KL_IN_REWARD,
    },
}


def merge_preset(base: dict, override: dict) -> dict:
    """`base` with `override` written over it, recursively for nested sections (neither is changed)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = (
            merge_preset(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out
