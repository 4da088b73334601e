"""The torchvision shim defines the `nms`/`qnms` schemas only when torchvision's own C ops do not
load, never over a working torchvision, and its import hook runs it once, on the first import."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_cluster.models import torchvision_ops


class _Library:
    """Stands in for torch.library.Library: records the schemas defined."""

    defined: list[str] = []

    def __init__(self, namespace: str, kind: str):
        assert (namespace, kind) == ("torchvision", "FRAGMENT")

    def define(self, schema: str) -> None:
        _Library.defined.append(schema)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process where torchvision is installed (at tmp_path) and not imported, no schema defined."""
    _Library.defined = []
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.setattr(torchvision_ops, "torchvision_dir", lambda: tmp_path)
    monkeypatch.setattr(torchvision_ops, "missing_schemas", lambda: list(torchvision_ops.SCHEMAS))
    monkeypatch.setattr(torch.library, "Library", _Library)
    monkeypatch.setattr(torchvision_ops, "_LIBRARIES", [])


def test_defines_both_schemas_when_the_c_ops_do_not_load(fresh, monkeypatch):
    monkeypatch.setattr(torchvision_ops, "c_ops_loadable", lambda package: False)
    assert torchvision_ops.ensure_torchvision_importable() is True
    assert _Library.defined == list(torchvision_ops.SCHEMAS)
    assert [s.split("(")[0] for s in _Library.defined] == ["nms", "qnms"]
    assert len(torchvision_ops._LIBRARIES) == 1  # kept alive


def test_never_shadows_a_working_torchvision(fresh, monkeypatch):
    monkeypatch.setattr(torchvision_ops, "c_ops_loadable", lambda package: True)
    assert torchvision_ops.ensure_torchvision_importable() is False
    assert _Library.defined == []


@pytest.mark.parametrize("case", ["absent", "imported", "already defined"])
def test_does_nothing_when_there_is_nothing_to_do(fresh, monkeypatch, case):
    monkeypatch.setattr(torchvision_ops, "c_ops_loadable", lambda package: False)
    if case == "absent":
        monkeypatch.setattr(torchvision_ops, "torchvision_dir", lambda: None)
    elif case == "imported":
        monkeypatch.setitem(sys.modules, "torchvision", object())
    else:
        monkeypatch.setattr(torchvision_ops, "missing_schemas", lambda: [])
    assert torchvision_ops.ensure_torchvision_importable() is False
    assert _Library.defined == []


def test_c_ops_loadable_is_false_for_a_library_that_does_not_load(tmp_path):
    assert torchvision_ops.c_ops_loadable(tmp_path) is False  # no _C at all
    (tmp_path / "_C.so").write_bytes(b"not a shared object")
    assert torchvision_ops.c_ops_loadable(tmp_path) is False


def test_the_import_hook_runs_once_on_the_first_torchvision_import(fresh, monkeypatch):
    calls = []
    monkeypatch.setattr(torchvision_ops, "ensure_torchvision_importable", lambda: calls.append(1))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    torchvision_ops.install_import_hook()
    torchvision_ops.install_import_hook()  # idempotent
    hooks = [f for f in sys.meta_path if isinstance(f, torchvision_ops._FirstImport)]
    assert len(hooks) == 1 and sys.meta_path[0] is hooks[0]
    assert hooks[0].find_spec("transformers") is None and calls == []
    assert hooks[0].find_spec("torchvision") is None  # it finds nothing itself
    assert calls == [1]
    assert not any(isinstance(f, torchvision_ops._FirstImport) for f in sys.meta_path)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed")
def test_torchvision_transforms_work_in_a_fresh_interpreter():
    """With the shim, torchvision imports and resizes whether or not its C ops load here."""
    code = (
        "import torch\n"
        "from rlhf_cluster.models.torchvision_ops import ensure_torchvision_importable\n"
        "ensure_torchvision_importable()\n"
        "from torchvision.transforms.v2 import functional as F\n"
        "print(tuple(F.resize(torch.rand(3, 20, 30), [10, 15]).shape))\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("(3, 10, 15)")
