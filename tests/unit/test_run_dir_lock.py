"""One job per run directory: a live job's lock refuses a second job (naming the first), a dead
job's lock is taken over, and a fresh job never silently wipes an earlier run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from rlhf_cluster.run.run_dir import RunDir, RunDirInUse
from rlhf_cluster.run.lock import RunDirBusy, holder

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from rlhf_cluster.run.run_dir import RunDir
    root = Path(sys.argv[1])
    RunDir(root, root / "weights", root / "checkpoints").prepare(fresh=True, job_name="first-job")
    print("locked", flush=True)
    time.sleep(600)
""")


def _run_dir(root):
    return RunDir(root, root / "weights", root / "checkpoints")


@pytest.fixture
def live_job(tmp_path):
    """A real second process that holds tmp_path/run as a job would."""
    root = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield root, proc
    proc.kill()
    proc.wait()


def test_a_second_job_on_a_live_run_dir_is_refused_naming_the_first(live_job):
    root, proc = live_job
    (root / "metrics.jsonl").write_text(json.dumps({"step": 0}) + "\n")
    for fresh in (True, False):  # neither a fresh job nor a resume may share a live job's directory
        with pytest.raises(RunDirBusy) as info:
            _run_dir(root).prepare(fresh=fresh, job_name="second-job", overwrite=True)
        msg = str(info.value)
        assert "'first-job'" in msg and f"pid {proc.pid}" in msg and str(root) in msg
        # The check the CLI makes before Ray starts, by reading alone, says the same.
        assert _run_dir(root).refusal(fresh=fresh, overwrite=True) == msg
    assert (root / "metrics.jsonl").exists(), "the refused job touched the live job's files"


def test_a_dead_jobs_lock_is_taken_over(live_job):
    root, proc = live_job
    assert holder(root)["pid"] == proc.pid and holder(root)["job"] == "first-job"  # what `status` shows
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (root / "job.lock").exists()  # the file stays; the lock died with its process
    assert holder(root) is None
    run_dir = _run_dir(root).prepare(fresh=False, job_name="after")
    assert json.loads((root / "job.lock").read_text())["job"] == "after"
    assert holder(root)["pid"] == os.getpid()
    run_dir.release()
    assert holder(root) is None, "a released lock names no holder, though its process lives on"


def test_a_fresh_job_refuses_an_earlier_run_unless_told_to_overwrite(tmp_path):
    root = tmp_path / "run"
    (root / "checkpoints" / "step-00000004").mkdir(parents=True)
    (root / "metrics.jsonl").write_text("".join(json.dumps({"step": i}) + "\n" for i in range(5)))
    with pytest.raises(RunDirInUse) as info:
        _run_dir(root).prepare(fresh=True, job_name="new")
    msg = str(info.value)
    assert "5 steps" in msg and "step-00000004" in msg and "--resume auto" in msg and "--overwrite" in msg
    # The CLI's check before Ray starts: the same refusal, and none for a resume or with --overwrite.
    assert _run_dir(root).refusal(fresh=True, overwrite=None) == msg
    assert _run_dir(root).refusal(fresh=False, overwrite=None) is None
    assert _run_dir(root).refusal(fresh=True, overwrite="delete") is None
    assert (root / "metrics.jsonl").exists() and (root / "checkpoints").exists()
    # The refusal let go of the lock; resuming keeps the files, overwriting removes them.
    _run_dir(root).prepare(fresh=False, job_name="resumed").release()
    assert (root / "metrics.jsonl").exists()
    _run_dir(root).prepare(fresh=True, job_name="new", overwrite=True).release()
    assert not (root / "metrics.jsonl").exists() and not (root / "checkpoints").exists()


def test_train_refuses_a_busy_or_used_run_dir_before_ray_starts(live_job, tmp_path, monkeypatch):
    """`rlhf-cluster train` on a live job's run_dir, or on an earlier run without --resume or
    --overwrite, exits 2 with the one-line refusal, before it connects to (or starts) Ray."""
    from typer.testing import CliRunner

    from actors.commands.cli import app

    root, proc = live_job
    config = tmp_path / "job.yaml"
    config.write_text(f"run_dir: {root}\n")
    reached: list[str] = []  # any call to Ray's connection is the test's failure
    monkeypatch.setattr("actors.commands.training.connect", lambda *args: reached.append("connect"))
    busy = CliRunner().invoke(app, ["train", str(config)])
    assert busy.exit_code == 2 and f"pid {proc.pid}" in busy.output and "Traceback" not in busy.output
    proc.kill()
    proc.wait()
    (root / "metrics.jsonl").write_text(json.dumps({"step": 0}) + "\n")
    used = CliRunner().invoke(app, ["train", str(config)])
    assert used.exit_code == 2 and "holds an earlier run" in used.output and "--resume auto" in used.output
    assert not reached, "the refusal came after Ray was reached"
    # The dry run reports it as it stands (a warning: that job may end, or --overwrite be given).
    dry = CliRunner().invoke(app, ["train", str(config), "--dry-run"])
    assert "warning: run_dir" in dry.output and "holds an earlier run" in dry.output


def test_a_lock_file_from_another_host_does_not_refuse_before_the_lock_is_tried(tmp_path):
    """A holder another host wrote cannot be checked for liveness from here (it may be a dead
    job's): the read-only check leaves the decision to the lock itself."""
    root = tmp_path / "run"
    root.mkdir()
    (root / "job.lock").write_text(json.dumps({"job": "elsewhere", "pid": 1, "host": "another-host",
                                               "started_at": "2026-11-26T00:00:00"}))
    assert holder(root)["host"] == "another-host"  # what `status` shows
    assert _run_dir(root).refusal(fresh=True, overwrite=None) is None
    _run_dir(root).prepare(fresh=True, job_name="here").release()  # the lock is free: the job starts


@pytest.mark.parametrize("mode", ["aside", "delete"])
def test_overwrite_leaves_nothing_of_the_earlier_run_a_new_one_would_read(tmp_path, mode):
    """Trial 23a B2: `--overwrite` left receipts.jsonl (a new run appended to the old one's proofs,
    which the served_proven invariant reads), data/held_out.json (compared with the new split: a
    false "held out no longer" warning) and the views' outputs. Every log the run appends to and
    every record its start writes goes; moved aside, all of it lands in RUN_DIR.old-<time>."""
    root = tmp_path / "run"
    (root / "checkpoints" / "step-00000001").mkdir(parents=True)
    written = [*RunDir.JSONL_LOGS, RunDir.EVAL, RunDir.CONFIG, *RunDir.DATA_RECORDS, "metrics.png", "trace.json"]
    for name in written:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("{}\n")
    (root / "replay" / "rank0").mkdir(parents=True)
    (root / "replay" / "rank0" / "digest.json").write_text("{}")
    _run_dir(root).prepare(fresh=True, job_name="new", overwrite=mode).release()
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert left == (["config.yaml", "job.lock"] if mode == "delete" else ["job.lock"])
    if mode == "aside":
        (aside,) = tmp_path.glob("run.old-*")
        moved = {str(p.relative_to(aside)) for p in aside.rglob("*") if p.is_file()}
        assert moved == {*written, "replay/rank0/digest.json"}
