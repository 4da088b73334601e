"""The small job config every job test starts from (the `job_config` fixture, and module-scoped
fixtures that cannot use a function-scoped one)."""

from __future__ import annotations

from pathlib import Path

from rlhf_cluster.config import JobConfig


def small_job_config(root: Path, model_cache: str, *, reference: bool = False, **sections) -> JobConfig:
    """A small JobConfig whose run lives under `root`; keyword sections override the defaults.

    A job runs without a reference model (and so without a KL term) unless the test asks for one
    with `reference=True`: a reference worker is a process that loads a model, about a quarter of a
    small job's start-up, and most tests are not about KL."""
    raw = {
        "name": "test",
        "run_dir": str(root / "run"),
        "model": {"cache_dir": model_cache},
        "data": {"num_prompts": 256, "eval_prompts": 0},
        "generation": {"replicas": 1, "prompts_per_request": 2, "sampling": {"n": 4, "max_new_tokens": 8}},
        "learner": {"world_size": 1, "lr": 1e-3},
        "train": {"total_steps": 4, "prompts_per_step": 4, "max_staleness": 1, "progress": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    if not reference:  # a test's own KL settings (a coefficient above 0) need reference=True
        raw["scoring"] = {"reference": False, **raw.get("scoring", {})}
        raw["algorithm"] = {"kl": {"coef": 0.0}, **raw.get("algorithm", {})}
    return JobConfig.model_validate(raw)
