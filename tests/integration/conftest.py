"""A real local Ray instance for the integration tests: own temp dir, shut down by this process.

`ray.init(address="local")` always starts a new head (it never attaches to another cluster on
the machine), and `ray.shutdown()` ends exactly the processes it started. No test calls
`ray stop`, which would kill every Ray process on the machine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
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
    shutil.rmtree(temp_dir, ignore_errors=True)  # Ray's session logs: 7-13 MB a run, never read after it


HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items):
    # This hook sees every collected item of the session: mark only tests under tests/integration.
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def demo_learns(tmp_path, model_cache):
    """Runs a demo config as the README does, at seed 0, and requires its sampled held-out accuracy
    to rise by at least `margin`; returns the config and the job's result."""

    def run(config: str, margin: float):
        from actors.job import run_job
        from rlhf_cluster.config import load_config

        cfg = load_config(config, [f"run_dir={tmp_path / Path(config).stem}", f"model.cache_dir={model_cache}",
                                   "train.progress=false", "seed=0",
                                   # the evaluations between the first and the last are for the
                                   # user's curve; the test asserts on those two alone
                                   "data.eval_every_steps=0"])
        assert cfg.data.eval_samples == 32 and cfg.data.eval_prompts == 30
        result = run_job(cfg)
        before, after = result.sampled_accuracy_before, result.sampled_accuracy_after
        print(f"held-out accuracy: sampled {before:.3f} -> {after:.3f}, greedy {result.accuracy_before:.3f} -> "
              f"{result.accuracy_after:.3f}")
        assert after - before >= margin, (f"sampled held-out accuracy rose by {after - before:+.3f}, less than the "
                                          f"margin {margin} ({before:.3f} -> {after:.3f})")
        return cfg, result

    return run


@pytest.fixture
def driver_assigned_on_its_loop(monkeypatch):
    """Records every assignment to the attributes of a Driver or its LearnerSlot made, once the
    driver runs, from a thread other than the one running its event loop (the driver's state belongs
    to its loop: worker threads return values, they do not assign). The test asserts the list it
    yields is empty."""
    from actors.checkpointer import LearnerSlot
    from actors.driver import Driver

    offenders: list[tuple[str, str, str]] = []
    loop_thread: list[threading.Thread] = []  # set when `Driver.run` starts
    run = Driver.run

    async def run_marked(self):
        loop_thread.append(threading.current_thread())
        return await run(self)

    def checked(self, name, value):
        if loop_thread and threading.current_thread() is not loop_thread[-1]:
            offenders.append((type(self).__name__, name, threading.current_thread().name))
        object.__setattr__(self, name, value)

    monkeypatch.setattr(Driver, "run", run_marked)
    for cls in (Driver, LearnerSlot):
        monkeypatch.setattr(cls, "__setattr__", checked)
    yield offenders
