"""One preflight for the dry run and the driver: every check that needs more than one field or a
file, before anything is written or started. Raises with the field and what was expected;
returns the warnings."""

from __future__ import annotations

from rlhf_cluster.config import JobConfig
from rlhf_cluster.scoring.rewards import load_reward_fn
from rlhf_cluster.validation import validate_model_dir, validate_reward_model_dir


def preflight(cfg: JobConfig) -> list[str]:
    """Check `cfg` against the files it names; returns its warnings."""
    if cfg.model.path is not None:
        validate_model_dir(cfg.model.path)
    if cfg.data.reward_fn is not None:
        load_reward_fn(cfg.data.reward_fn)
    for spec in cfg.scoring.reward_models:
        validate_reward_model_dir(spec.path)
    if cfg.algorithm.advantage == "gae" and cfg.critic is not None and cfg.critic.init != "policy":
        validate_reward_model_dir(cfg.critic.init, field="critic.init")
    return cfg.warnings()
