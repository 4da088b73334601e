"""On a CPU torch with the package index's CUDA-linked torchvision, the shim's note that it defined
the `nms`/`qnms` schemas (expected there, and handled) is logged at DEBUG: an INFO console (every
`train` and `--dry-run`) does not show it. A real interpreter of this environment imports torchvision."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from rlhf_cluster.models import torchvision_ops

NOTE = "torchvision's C ops do not load"
SCRIPT = """
import logging, sys
logging.basicConfig(level=getattr(logging, sys.argv[1]), format="%(levelname)s %(name)s %(message)s")
from rlhf_cluster.models.torchvision_ops import install_import_hook
install_import_hook()  # what the CPU install's .pth does at every interpreter start
import torchvision
"""


def _import_torchvision(level: str) -> str:
    done = subprocess.run([sys.executable, "-c", SCRIPT, level], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_the_shims_note_is_debug_only():
    package = torchvision_ops.torchvision_dir()
    if importlib.util.find_spec("torchvision") is None or package is None or torchvision_ops.c_ops_loadable(package):
        pytest.skip("torchvision is absent or its C ops load here: the shim does nothing")
    assert NOTE not in _import_torchvision("INFO")
    lines = [line for line in _import_torchvision("DEBUG").splitlines() if NOTE in line]
    assert lines and all(line.startswith("DEBUG rlhf_cluster.models.torchvision_ops ") for line in lines), lines
