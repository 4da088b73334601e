"""Nothing is lost: resume never deletes what it cannot verify, --overwrite moves a run aside,
the JSONL logs survive a torn final line, a failed scored-log flush keeps its groups, a crash
inside write_dir_atomic leaves a complete version, and checkpoint RNG state loads without pickle.
Single process, real files under tmp_path."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlhf_cluster import fileio
from rlhf_cluster.run.checkpoint import CheckpointStore, NoVerifiedCheckpoint
from rlhf_cluster.learner.host_state import encode_host_state, load_host_state, rng_state, set_rng_state
from rlhf_cluster.experience.records import ScoredSample
from rlhf_cluster.fileio import CorruptLogError
from rlhf_cluster.run.run_dir import RunDir, RunDirInUse
from rlhf_cluster.run.scored_log import ScoredLog, ScoredLogFlushError

REPO = Path(__file__).resolve().parents[2]


# ---- helpers ----------------------------------------------------------------------------------
def _run_dir(root: Path, checkpoints: Path | None = None) -> RunDir:
    return RunDir(root, root / "weights", checkpoints or root / "checkpoints")


def _checkpoint(store: CheckpointStore, step: int) -> Path:
    tmp = store.begin(step)
    (tmp / "learner" / "shard.distcp").write_bytes(b"weights" + bytes([step]))
    (tmp / "driver.json").write_text(json.dumps({"step": step}))
    return store.finalize(tmp, step, step + 1, {"rank_digests": ["d"]}).path


def _a_run(root: Path, steps: int = 9, checkpoint_steps=(2, 5, 8)) -> CheckpointStore:
    """A run directory as a job leaves it: step logs, scored log, weights, trace and checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    for name in (RunDir.METRICS, RunDir.CONSUMED, RunDir.SAMPLES):
        (root / name).write_text("".join(json.dumps({"step": i, "x": name}) + "\n" for i in range(steps)))
    (root / RunDir.TRACE).write_text(json.dumps({"span": "step"}) + "\n")
    (root / "scored").mkdir()
    (root / "scored" / "seg-0000000000-0000000003.arrow").write_bytes(b"arrow")
    (root / "weights" / "v00000009").mkdir(parents=True)
    (root / "weights" / "v00000009" / "model.safetensors").write_bytes(b"tensors")
    store = CheckpointStore(root / "checkpoints", keep=5)
    for step in checkpoint_steps:
        _checkpoint(store, step)
    return store


def _snapshot(*roots: Path) -> dict[str, str]:
    """Every file under `roots` (the lock file aside) by path, with the sha256 of its bytes."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(root.rglob("*")) if p.is_file() and p.name != "job.lock"}


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))


def _open_run(root: Path, resume: str, job_name: str, overwrite: str | bool = False) -> tuple[RunDir, object]:
    """The job's start on `root`'s run: (its run directory, locked; the checkpoint to resume from)."""
    from actors.checkpointer import job_checkpoints, open_run

    cfg = SimpleNamespace(checkpoint_dir=root / "checkpoints", checkpoint=SimpleNamespace(keep=5),
                          guardrails=SimpleNamespace(keep_best=0, higher_is_better=True))
    run_dir = _run_dir(root)
    return run_dir, open_run(run_dir, job_checkpoints(cfg), resume, overwrite, job_name)


def _group(gid: str) -> list[ScoredSample]:
    return [ScoredSample(sample_id=f"{gid}-{i}", prompt_id=gid, group_id=gid, prompt_ids=[1, 2], response_ids=[3, 4],
                         rollout_logprobs=[-1.0, -2.0], policy_version=1, finish_reason="stop", reward=float(i),
                         reward_components={}, ref_logprobs=[-1.1, -2.1], advantages=[0.0, 0.0]) for i in range(2)]


# ---- resume never deletes what it cannot verify -------------------------------------------------
def test_resume_auto_falls_back_to_an_older_verified_checkpoint_and_keeps_the_damaged_one(tmp_path, caplog):
    root = tmp_path / "run"
    store = _a_run(root)
    newest = store.list()[-1]
    _flip_a_byte(newest / "learner" / "shard.distcp")
    before = _snapshot(root)

    with caplog.at_level(logging.WARNING, logger="actors.checkpointer"):
        run_dir, chosen = _open_run(root, "auto", "resumed")
    run_dir.release()

    assert chosen is not None and chosen.step == 5, "the newest checkpoint that verifies"
    out = caplog.text  # a warning on the job's console
    assert "refusing checkpoint" in out and "step-00000008" in out and "learner/shard.distcp" in out
    kept = root / "checkpoints" / "refused-step-00000008"
    assert kept.is_dir() and not newest.exists()
    # Every file of the run is still there, byte for byte; the damaged checkpoint under its new name.
    after = _snapshot(root)
    assert after == {k.replace("/step-00000008/", "/refused-step-00000008/"): v for k, v in before.items()}
    # A later checkpoint of the same step, or retention, cannot delete it.
    store.keep = 1
    _checkpoint(store, 8)
    assert kept.is_dir() and [p.name for p in store.list()] == ["step-00000008"]


def test_resume_auto_beside_overwrite_says_the_overwrite_is_not_applied(tmp_path, caplog):
    """Trial 23a M7: `--resume auto --overwrite` on a run with a checkpoint resumed, dropping the
    overwrite silently; it is said (without a checkpoint the overwrite applies to the fresh start)."""
    root = tmp_path / "run"
    _a_run(root)
    before = _snapshot(root)
    with caplog.at_level(logging.WARNING, logger="actors.checkpointer"):
        run_dir, chosen = _open_run(root, "auto", "resumed", overwrite="aside")
    run_dir.release()
    assert chosen is not None and _snapshot(root) == before
    assert "--overwrite is not applied: --resume auto continues the run from step-00000008" in caplog.text


def test_resume_auto_refuses_when_no_checkpoint_verifies_naming_each_and_changing_nothing(tmp_path):
    root = tmp_path / "run"
    store = _a_run(root)
    step2, step5, step8 = store.list()
    _flip_a_byte(step8 / "learner" / "shard.distcp")
    (step5 / "manifest.json").write_text((step5 / "manifest.json").read_text()[:40])  # a torn manifest
    (step2 / "manifest.json").unlink()  # a step directory without a manifest is a damaged checkpoint too
    before = _snapshot(root)

    with pytest.raises(NoVerifiedCheckpoint) as info:
        _open_run(root, "auto", "resumed")

    msg = str(info.value)
    assert "none of the 3 checkpoint(s)" in msg and "nothing was changed on disk" in msg
    assert re.search(r"step-00000008: file learner/shard.distcp does not match its sha256", msg)
    assert re.search(r"step-00000005: manifest.json is not valid JSON", msg)
    assert re.search(r"step-00000002: no manifest.json", msg)
    assert "--overwrite" in msg and "--resume PATH" in msg
    assert _snapshot(root) == before, "a refused resume changed the run directory"
    assert not list(tmp_path.glob("run.old-*"))
    _run_dir(root).prepare(fresh=False, job_name="next").release()  # the refusal let go of the lock


def test_resume_auto_with_no_checkpoint_at_all_starts_over_with_the_earlier_files_moved_aside(tmp_path):
    root = tmp_path / "run"
    _a_run(root, steps=2, checkpoint_steps=())
    before = _snapshot(root)

    run_dir, chosen = _open_run(root, "auto", "resumed")
    assert chosen is None
    run_dir.release()

    (aside,) = tmp_path.glob("run.old-*")
    assert _snapshot(aside) == {k.replace(str(root), str(aside)): v for k, v in before.items()}
    assert not (root / RunDir.METRICS).exists()


def test_overwrite_moves_the_earlier_run_aside_and_only_delete_deletes(tmp_path):
    root, elsewhere = tmp_path / "run", tmp_path / "shared" / "ckpts"
    _a_run(root)
    (root / RunDir.CONFIG).write_text("name: old\n")
    elsewhere.parent.mkdir()
    (root / "checkpoints").rename(elsewhere)  # checkpoint.dir outside the run directory
    before_run, before_ckpts = _snapshot(root), _snapshot(elsewhere)
    with pytest.raises(RunDirInUse, match="moves it aside"):
        _run_dir(root, elsewhere).prepare(fresh=True, job_name="new")

    _run_dir(root, elsewhere).prepare(fresh=True, job_name="new", overwrite=True).release()

    (aside,) = tmp_path.glob("run.old-*")
    assert _snapshot(aside) == {k.replace(str(root), str(aside)): v for k, v in before_run.items()}
    (ckpts_aside,) = elsewhere.parent.glob("ckpts.old-*")
    assert _snapshot(ckpts_aside) == {k.replace(str(elsewhere), str(ckpts_aside)): v for k, v in before_ckpts.items()}
    assert not (root / RunDir.METRICS).exists() and not elsewhere.exists()

    _a_run(root)  # a second run, overwritten with delete: gone, and no new aside copy
    _run_dir(root).prepare(fresh=True, job_name="new", overwrite="delete").release()
    assert not (root / RunDir.METRICS).exists() and not (root / "checkpoints").exists()
    assert len(list(tmp_path.glob("run.old-*"))) == 1
    with pytest.raises(ValueError, match="--overwrite=delete"):
        _run_dir(root).prepare(fresh=True, job_name="new", overwrite="everything")


def test_the_cli_takes_a_bare_overwrite_as_aside_and_overwrite_equals_delete():
    import typer.main

    from actors.commands.cli import app
    from actors.commands.supervisor import _resuming

    train = typer.main.get_command(app).commands["train"]
    for args, expected in ((["job.yaml", "--overwrite"], "aside"), (["job.yaml", "--overwrite=delete"], "delete"),
                           (["job.yaml"], None)):
        assert train.make_context("train", args).params["overwrite"] == expected, args
    # A retried driver resumes; it never starts over, in either mode.
    assert _resuming(["job.yaml", "--overwrite=delete"]) == ["job.yaml", "--resume", "auto"]


# ---- JSONL logs survive a torn final line ------------------------------------------------------
@pytest.mark.parametrize("tail", [b'{"step": 9, "x": "metr', b"\0" * 64], ids=["half-a-line", "nul-blocks"])
def test_a_torn_final_line_is_tolerated_then_cut_off_on_resume_with_a_warning(tmp_path, caplog, tail):
    root = tmp_path / "run"
    _a_run(root)
    whole = (root / RunDir.METRICS).read_bytes()
    with open(root / RunDir.METRICS, "ab") as fh:  # what power loss mid-append leaves
        fh.write(tail)
    run_dir = _run_dir(root)
    assert [r["step"] for r in run_dir.read(RunDir.METRICS)] == list(range(9))

    with caplog.at_level(logging.WARNING, logger="rlhf_cluster.run.run_dir"):
        run_dir.prepare(fresh=False, job_name="resumed")
    assert (root / RunDir.METRICS).read_bytes() == whole
    assert any(RunDir.METRICS in r.getMessage() and "cut off" in r.getMessage() for r in caplog.records)
    run_dir.keep_steps(4)
    run_dir.append(RunDir.METRICS, [{"step": 5}])
    assert [r["step"] for r in run_dir.read(RunDir.METRICS)] == list(range(6))
    run_dir.release()


def test_a_whole_final_row_without_its_newline_is_kept_and_ended(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    (root / RunDir.CONSUMED).write_text('{"step": 0}\n{"step": 1}')
    run_dir = _run_dir(root).prepare(fresh=False, job_name="resumed")
    run_dir.append(RunDir.CONSUMED, [{"step": 2}])
    assert [r["step"] for r in run_dir.read(RunDir.CONSUMED)] == [0, 1, 2]
    run_dir.release()


def test_a_damaged_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    root = tmp_path / "run"
    _a_run(root)
    lines = (root / RunDir.SAMPLES).read_text().splitlines(keepends=True)
    lines[3] = '{"step": 3, "x"\n'
    (root / RunDir.SAMPLES).write_text("".join(lines))
    before = _snapshot(root)
    with pytest.raises(CorruptLogError, match=rf"{re.escape(str(root / RunDir.SAMPLES))}: line 4 .* 5 line\(s\) follow"):
        _run_dir(root).keep_steps(8)
    with pytest.raises(CorruptLogError, match="line 4"):
        _run_dir(root).prepare(fresh=False, job_name="resumed")
    assert _snapshot(root) == before


# ---- a failed scored-log flush keeps its groups ------------------------------------------------
def test_a_flush_that_hits_a_full_disk_keeps_its_groups_and_the_next_flush_writes_them(tmp_path, monkeypatch):
    log = ScoredLog(tmp_path / "scored")
    log.append(_group("a"), "buffered")
    log.append(_group("b"), "zero_signal")
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ScoredLogFlushError, match="2 scored group") as info:
        log.flush()
    assert info.value.__cause__.errno == errno.ENOSPC
    assert (log.unflushed, log.failed_flushes) == (2, 1)
    assert not list((tmp_path / "scored").iterdir()), "a failed flush left a (partial) segment behind"

    log.append(_group("c"), "buffered")  # the job goes on; the disk frees up
    monkeypatch.setattr(os, "fsync", real_fsync)
    log.flush()

    assert (log.unflushed, log.failed_flushes) == (0, 0)
    reread = ScoredLog(tmp_path / "scored").since(0)
    assert [(fate, g[0].group_id) for fate, g in reread] == [("buffered", "a"), ("zero_signal", "b"), ("buffered", "c")]
    assert [p.name for p in (tmp_path / "scored").iterdir()] == ["seg-0000000000-0000000002.arrow"]


# ---- write_dir_atomic: a crash at any point leaves a complete version ----------------------------
def _write_version(text: str):
    def write(tmp: Path) -> None:
        (tmp / "a.txt").write_text(text)
        (tmp / "b.txt").write_text(text)
    return write


@pytest.mark.parametrize("crash_at_rename", [1, 2, 3], ids=["old-aside", "new-in", "old-doomed"])
def test_write_dir_atomic_crashing_between_its_renames_leaves_one_complete_version(tmp_path, monkeypatch, crash_at_rename):
    target = tmp_path / "model"
    fileio.write_dir_atomic(target, _write_version("old"))
    real_rename, calls = Path.rename, []

    def crashing_rename(self, dest):
        calls.append(self)
        if len(calls) == crash_at_rename:
            raise KeyboardInterrupt("killed here")  # as a kill would: nothing after this runs
        return real_rename(self, dest)

    monkeypatch.setattr(Path, "rename", crashing_rename)
    with pytest.raises(KeyboardInterrupt):
        fileio.write_dir_atomic(target, _write_version("new"))
    monkeypatch.setattr(Path, "rename", real_rename)

    fileio.recover_dir(target)  # what the next writer (or a reader) does first
    texts = {(target / n).read_text() for n in ("a.txt", "b.txt")}
    assert texts in ({"old"}, {"new"}), "not one complete version"
    assert texts == ({"old"} if crash_at_rename < 3 else {"new"})
    fileio.write_dir_atomic(target, _write_version("newer"))  # and the next write goes through
    assert {(target / n).read_text() for n in ("a.txt", "b.txt")} == {"newer"}
    assert not [p for p in tmp_path.iterdir() if ".doomed." in p.name or p.name.endswith(".old")]


# ---- checkpoint RNG state without pickle --------------------------------------------------------
def _draws() -> tuple:
    return random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.standard_normal()), torch.rand(3).tolist()


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.gauss(0, 1), np.random.standard_normal()  # cached Gaussians are part of the state
    path = tmp_path / "rank0.pt"
    torch.save(encode_host_state(rng_state(), {"base_lrs": [0.001], "last_epoch": 3, "lr_lambdas": [None]}, 7, "fsdp2"), path)
    expected = _draws()
    torch.load(path, weights_only=True)  # the file holds only what a weights-only load accepts

    _draws()
    state = load_host_state(path)
    set_rng_state(state["rng"])

    assert _draws() == expected
    assert (state["step"], state["backend"], state["scheduler"]["last_epoch"]) == (7, "fsdp2", 3)
    assert state["updates"] == 7  # not given: as many as steps
    torch.save(encode_host_state(rng_state(), {"last_epoch": 3}, 7, "fsdp2", updates=5), path)
    assert load_host_state(path)["updates"] == 5  # two of the 7 steps skipped their update


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["DATA_LOSS_MARKER"]),))


def test_a_host_state_file_that_needs_unpickling_is_refused_without_running_its_code(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv("DATA_LOSS_MARKER", str(marker))
    hostile = tmp_path / "rank0.pt"
    torch.save({"rng": rng_state(), "step": 1, "payload": _Payload()}, hostile)  # the format-1 layout, plus code
    with pytest.raises(RuntimeError, match=rf"{re.escape(str(hostile))}: not a host-state file"):
        load_host_state(hostile)
    assert not marker.exists(), "loading a checkpoint ran code from it"


def test_deepspeed_checkpoint_files_load_weights_only_and_code_in_them_is_refused(tmp_path, monkeypatch):
    """DeepSpeed's own engine unpickles its checkpoint files; the learner swaps in an engine that
    loads them with weights_only=True (what ZeRO-3 files hold loads, a payload with code does not)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from rlhf_cluster.learner.deepspeed_checkpoint import WeightsOnlyCheckpointEngine

    engine = WeightsOnlyCheckpointEngine()
    like_zero3 = {"optimizer_state_dict": {"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(1.0),
                                           "fp32_flat_groups": [torch.arange(4.0)]}, "ds_version": "0.x"}
    good = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    engine.save(like_zero3, str(good))
    loaded = engine.load(str(good), map_location=lambda storage, loc: storage)["optimizer_state_dict"]
    assert loaded["zero_stage"] is ZeroStageEnum.weights and isinstance(loaded["loss_scaler"], LossScaler)
    assert torch.equal(loaded["fp32_flat_groups"][0], torch.arange(4.0))

    marker = tmp_path / "ran"
    monkeypatch.setenv("DATA_LOSS_MARKER", str(marker))
    hostile = tmp_path / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torch.save({**like_zero3, "payload": _Payload()}, hostile)
    with pytest.raises(ValueError, match=rf"{re.escape(str(hostile))} holds objects a checkpoint may not hold"):
        engine.load(str(hostile))
    assert not marker.exists(), "loading a DeepSpeed checkpoint ran code from it"


def test_nothing_in_the_project_unpickles_a_file():
    offenders = []
    for path in [*REPO.glob("rlhf_cluster/**/*.py"), *REPO.glob("actors/**/*.py")]:
        text = path.read_text()
        for match in re.finditer(r"torch\.load\((?:[^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in match.group(0):
                offenders.append(f"{path.relative_to(REPO)}: {match.group(0)}")
        offenders += [f"{path.relative_to(REPO)}: {m}" for m in re.findall(r"pickle\.loads?\(.*", text)]
    assert not offenders, offenders

