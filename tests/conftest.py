"""Shared fixtures: a tiny model built once per session, and job configs pointing at tmp dirs."""

from __future__ import annotations


import pytest

from rlhf_cluster.config import JobConfig, TinyModelConfig
from rlhf_cluster.models.tiny_model import ensure_tiny_model
from tests.process_groups import one_rank_process_group


@pytest.fixture(autouse=True)
def _environment_restored():
    """Whatever a test sets in os.environ (e.g. the CLI's RAY_AUTH_MODE, run in-process through
    CliRunner) is undone after it: a later test's Ray start must not inherit it."""
    import os

    saved = dict(os.environ)
    yield
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    os.environ.update(saved)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_model_path(model_cache) -> str:
    return str(ensure_tiny_model(TinyModelConfig(), model_cache))


@pytest.fixture
def job_config(tmp_path, model_cache):
    """Build a small JobConfig in tmp dirs; keyword sections override the defaults.

    A job runs without a reference model (and so without a KL term) unless the test asks for one
    with `reference=True`: a reference worker is a process that loads a model, about a quarter of a
    small job's start-up, and most tests are not about KL."""

    def make(*, reference: bool = False, **sections) -> JobConfig:
        raw = {
            "name": "test",
            "run_dir": str(tmp_path / "run"),
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

    return make


@pytest.fixture
def gloo_group():
    """A one-rank gloo process group (for code that needs torch.distributed on the CPU)."""
    with one_rank_process_group("gloo"):
        yield
