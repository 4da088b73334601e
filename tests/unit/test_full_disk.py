"""A run's logs on a full disk (found by the soak, issue 58: a step's append of consumed.jsonl
failed with ENOSPC and ended the job): an append waits for space and then writes its rows whole,
once; what a failed try wrote is cut off; the wait is a `disk_full` event; a disk that stays full
past `FULL_DISK_WAIT_S` is an error naming the file, and leaves nothing half-written. A resume
cuts its step logs in place, and a failed atomic write leaves no temp file. A weight version's
write waits for space the same way. The full disk is a stand-in `open` (or `fsync`, or
safetensors' `save_file`) that fails as a full disk does."""

from __future__ import annotations

import builtins
import errno

import pytest
import torch
from safetensors import SafetensorError

import rlhf_cluster.fileio as fileio
import rlhf_cluster.run.run_dir as run_dir_module
import rlhf_cluster.weights.store as store_module
from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.weights.store import WeightStore


class _FullFor:
    """`open` for a disk that is full for the first `tries` appends: each writes half its text, then fails."""

    def __init__(self, tries: int):
        self.tries = tries

    def __call__(self, path, mode="r", *args, **kwargs):
        fh = builtins.open(path, mode, *args, **kwargs)
        if "a" not in mode or self.tries == 0:
            return fh
        self.tries -= 1
        real_write = fh.write

        def write(text):
            real_write(text[: len(text) // 2])
            fh.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        fh.write = write
        return fh


@pytest.fixture
def run(tmp_path):
    run = RunDir(tmp_path / "run", tmp_path / "w", tmp_path / "c")
    run.root.mkdir()
    run.append(RunDir.METRICS, [{"step": 0}])
    return run


def test_an_append_waits_out_a_full_disk_and_writes_its_rows_once(run, monkeypatch):
    monkeypatch.setattr(run_dir_module, "open", _FullFor(tries=2), raising=False)
    monkeypatch.setattr(run_dir_module.time, "sleep", lambda s: None)
    run.append(RunDir.METRICS, [{"step": 1, "x": "a" * 100}, {"step": 2}])
    assert [r["step"] for r in run.read(RunDir.METRICS)] == [0, 1, 2]
    (event,) = run.read(RunDir.EVENTS)
    assert event["event"] == "disk_full" and event["file"] == RunDir.METRICS


def test_a_disk_that_stays_full_is_an_error_naming_the_file_with_nothing_half_written(run, monkeypatch):
    monkeypatch.setattr(run_dir_module, "open", _FullFor(tries=10**6), raising=False)
    monkeypatch.setattr(run_dir_module.time, "sleep", lambda s: None)
    monkeypatch.setattr(RunDir, "FULL_DISK_WAIT_S", -1.0)
    with pytest.raises(OSError, match="metrics.jsonl: the disk stayed full"):
        run.append(RunDir.METRICS, [{"step": 1, "x": "a" * 100}])
    assert (run / RunDir.METRICS).read_text() == '{"step": 0}\n'


def test_rows_of_no_step_outlive_a_resume(run):
    """keep_steps (a resume) cuts the step logs after the checkpoint's step; a recovery's event
    row (no step) stays."""
    run.append(RunDir.EVENTS, [{"step": 5, "event": "guardrails"}])
    run.event("worker_replaced", pool="generation", worker="gen0")
    run.keep_steps(3)
    assert [e["event"] for e in run.read(RunDir.EVENTS)] == ["worker_replaced"]


def test_a_resume_cuts_a_step_log_in_place_needing_no_room_for_a_copy(run):
    """Found by the soak: each resume rewrote consumed.jsonl (235 MB after an hour) through a
    temp copy, so a nearly full disk failed every resume. Rows appended in step order are now cut
    where the kept steps end, in place (the same file, no temp)."""
    run.append(RunDir.METRICS, [{"step": s} for s in range(1, 6)])
    inode = (run / RunDir.METRICS).stat().st_ino
    run.keep_steps(2)
    assert [r["step"] for r in run.read(RunDir.METRICS)] == [0, 1, 2]
    assert (run / RunDir.METRICS).stat().st_ino == inode and not list(run.root.glob(".*.tmp"))
    run.keep_steps(7)  # nothing after it: unchanged
    assert [r["step"] for r in run.read(RunDir.METRICS)] == [0, 1, 2]


def test_a_failed_atomic_write_leaves_no_temp_file_taking_space(tmp_path, monkeypatch):
    """Found by the soak: each failed rewrite on a full disk left its partial temp file, so the
    next resume found even less room."""
    real_fsync = fileio.os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full)
    with pytest.raises(OSError):
        fileio.write_atomic(tmp_path / "log.jsonl", "x" * 1000)
    monkeypatch.setattr(fileio.os, "fsync", real_fsync)
    assert list(tmp_path.iterdir()) == []


class _SaveFullFor:
    """safetensors' `save_file` on a disk full for its first `tries` calls: it writes part of the
    shard, then fails as its Rust writer does (a SafetensorError, not an OSError)."""

    def __init__(self, real, tries: int):
        self.real, self.tries, self.calls = real, tries, 0

    def __call__(self, tensors, filename, metadata=None):
        self.calls += 1
        if self.tries == 0:
            return self.real(tensors, filename, metadata=metadata)
        self.tries -= 1
        with builtins.open(filename, "wb") as fh:
            fh.write(b"\0" * 64)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _state() -> dict[str, torch.Tensor]:
    return {"a.weight": torch.arange(12.0).reshape(3, 4), "b.bias": torch.ones(5)}


def test_a_weight_version_waits_out_a_full_disk_and_is_written_whole(tmp_path, monkeypatch):
    """Found by the soak: the learner's snapshot of a version (`publish_async`) failed on the
    full disk, and that failure ended the job (a SafetensorError out of `LearnerRank.train`).
    The write now waits for space as the logs' appends do, then writes the version whole."""
    save = _SaveFullFor(store_module.safetensors.torch.save_file, tries=3)
    monkeypatch.setattr(store_module.safetensors.torch, "save_file", save)
    monkeypatch.setattr(fileio.time, "sleep", lambda s: None)
    store = WeightStore(tmp_path / "weights")
    written = store.publish_async(1, _state()).result(timeout=60)
    assert save.calls == 4 and written["path"].endswith("v00000001")
    assert store.latest_version() == 1
    assert all(torch.equal(store.load(1)[k], v) for k, v in _state().items())  # checksums verified
    assert [p.name for p in (tmp_path / "weights").iterdir() if p.name.startswith(".")] == []


def test_a_weight_version_on_a_disk_that_stays_full_fails_naming_it_with_nothing_left(tmp_path, monkeypatch):
    save = _SaveFullFor(store_module.safetensors.torch.save_file, tries=10**6)
    monkeypatch.setattr(store_module.safetensors.torch, "save_file", save)
    monkeypatch.setattr(fileio.time, "sleep", lambda s: None)
    monkeypatch.setattr(WeightStore, "FULL_DISK_WAIT_S", -1.0)
    store = WeightStore(tmp_path / "weights")
    with pytest.raises(OSError, match="version 1: the disk stayed full"):
        store.publish(1, _state())
    assert store.latest_version() is None and list((tmp_path / "weights").iterdir()) == []


@pytest.mark.parametrize(
    ("exc", "full"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
        (OSError(errno.EIO, "Input/output error"), False),
        (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), True),
        (SafetensorError("Error while serializing: I/O error: Input/output error (os error 5)"), False),
        (ValueError("bad shape"), False),
    ],
)
def test_what_counts_as_a_full_disk(exc, full):
    assert fileio.is_disk_full(exc) is full
