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


@pytest.fixture
def user_module_of(tmp_path, monkeypatch):
    """`write(source, prefix)`: `source` (dedented) as a module in tmp_path, on sys.path under a
    fresh name (`<prefix>_<hex>`, so no test imports another's); returns the name."""

    def write(source: str, prefix: str = "user_module") -> str:
        import textwrap
        import uuid

        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.syspath_prepend(str(tmp_path))
        return name

    return write
