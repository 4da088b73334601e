"""Device tests: every test here takes the `device` fixture and runs twice, on the CPU inside
`make test` (so an API change fails CI, not the next GPU run) and on CUDA where present (the CUDA
half is skipped without it). A test here without the fixture is refused at collection."""

from pathlib import Path

import pytest
import torch

from rlhf_cluster.learner import base as learner_base
from tests.process_groups import one_rank_process_group

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    # This hook sees every collected item of the session: act only on tests under tests/gpu.
    for item in items:
        if HERE not in Path(item.path).resolve().parents:
            continue
        if "device" not in getattr(item, "fixturenames", ()):
            raise pytest.UsageError(f"{item.nodeid}: a tests/gpu test must take the `device` fixture (CPU and CUDA)")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request, monkeypatch) -> torch.device:
    """The device a test body runs on. The learners place themselves on CUDA wherever it is
    present, so the CPU half tells them otherwise."""
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs CUDA")
        torch.cuda.set_device(0)
    else:
        monkeypatch.setattr(learner_base, "default_device", lambda: torch.device("cpu"))
    return torch.device(request.param)


@pytest.fixture
def device_group(device):
    """A one-rank process group for `device`: NCCL on CUDA, gloo on the CPU."""
    with one_rank_process_group("nccl" if device.type == "cuda" else "gloo"):
        yield device
