"""Shared fixtures: a tiny model built once per session, and job configs pointing at tmp dirs."""

from __future__ import annotations

from functools import partial

import pytest

from rlhf_cluster.config import TinyModelConfig
from rlhf_cluster.models.tiny_model import ensure_tiny_model
from tests.job_configs import small_job_config
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
    """`small_job_config` in the test's tmp_path."""
    return partial(small_job_config, tmp_path, model_cache)


@pytest.fixture
def gloo_group():
    """A one-rank gloo process group (for code that needs torch.distributed on the CPU)."""
    with one_rank_process_group("gloo"):
        yield
