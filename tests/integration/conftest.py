"""A real local Ray instance for the integration tests: own temp dir, shut down by this process.

`ray.init(address="local")` always starts a new head (it never attaches to another cluster on
the machine), and `ray.shutdown()` ends exactly the processes it started. No test calls
`ray stop`, which would kill every Ray process on the machine.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    temp_dir = tempfile.mkdtemp(prefix="rlhf-ray-", dir="/tmp")
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, _temp_dir=temp_dir,
             log_to_driver=False)
    yield ray
    ray.shutdown()


HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items):
    # This hook sees every collected item of the session: mark only tests under tests/integration.
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)
