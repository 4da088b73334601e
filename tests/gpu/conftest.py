"""GPU tests run only where CUDA is present; elsewhere they are skipped with the reason."""

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    # This hook sees every collected item of the session: act only on tests under tests/gpu.
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if HERE not in Path(item.path).resolve().parents:
            continue
        item.add_marker(pytest.mark.gpu)
        if not torch.cuda.is_available():
            item.add_marker(skip)
