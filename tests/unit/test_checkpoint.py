"""CheckpointStore: atomic, verified, pruned; a corrupted or half-written checkpoint is never used."""

from __future__ import annotations

import errno
import json

import pytest

from rlhf_cluster.run import checkpoint as ckpt_mod
from rlhf_cluster.run.checkpoint import CheckpointError, CheckpointStore


def _write(store: CheckpointStore, step: int, payload: bytes = b"weights") -> ckpt_mod.Checkpoint:
    tmp = store.begin(step)
    (tmp / "learner" / "shard.distcp").write_bytes(payload + bytes([step]))
    (tmp / "driver.json").write_text(json.dumps({"step": step}))
    return store.finalize(tmp, step, step + 1, {"rank_digests": ["d"]})


def test_finalize_writes_a_verified_manifest_and_prunes(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for step in (2, 5, 8):
        _write(store, step)
    assert [p.name for p in store.list()] == ["step-00000005", "step-00000008"]
    latest = store.latest()
    assert (latest.step, latest.version) == (8, 9)
    assert set(latest.manifest["files"]) == {"learner/shard.distcp", "driver.json"}
    assert not list(tmp_path.glob(".*")), "temp directories left behind"


def test_a_corrupted_checkpoint_is_refused_and_the_one_before_is_taken(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    _write(store, 2)
    newest = _write(store, 5)
    shard = newest.path / "learner" / "shard.distcp"
    data = bytearray(shard.read_bytes())
    data[0] ^= 0xFF  # one flipped byte
    shard.write_bytes(bytes(data))
    refused = []
    chosen = store.latest(on_refused=refused.append)
    assert chosen.step == 2
    assert len(refused) == 1 and "step-00000005" in str(refused[0]) and "learner/shard.distcp" in str(refused[0])
    with pytest.raises(CheckpointError, match="learner/shard.distcp does not match its sha256"):
        CheckpointStore.verify(newest.path)


def test_missing_manifest_or_file_is_a_clear_error(tmp_path):
    store = CheckpointStore(tmp_path)
    done = _write(store, 3)
    (done.path / "driver.json").unlink()
    with pytest.raises(CheckpointError, match="driver.json is missing"):
        CheckpointStore.verify(done.path)
    with pytest.raises(CheckpointError, match="no manifest.json"):
        CheckpointStore.verify(tmp_path / "nowhere")


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path, keep=3)
    _write(store, 2)

    def full(_root):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "_fsync_tree", full)
    with pytest.raises(OSError, match="No space left"):
        _write(store, 5)
    assert [p.name for p in store.list()] == ["step-00000002"]
    assert not list(tmp_path.glob(".step-*")), "the half-written checkpoint was left behind"
    assert store.latest().step == 2
