"""`rlhf-cluster train --resume auto` on a run that already trained its last step says so and ends
(exit code 0) before Ray starts; it used to start Ray and every pool (24 s) to train nothing. A run
with steps left, or whose final checkpoint does not verify (the job falls back to an older one),
goes on to start as before. A real run directory with real checkpoints; Ray is never started."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import actors.commands.training as training
from actors.commands.cli import app
from rlhf_cluster.run.checkpoint import CheckpointStore


class _RayStarted(Exception):
    pass


def _refuse_to_start(*args, **kwargs):
    raise _RayStarted("the job went on to start Ray")


@pytest.fixture
def finished(job_config, tmp_path, monkeypatch):
    """A run that trained all of its 3 steps: its config file, metrics and checkpoints (steps 1 and 2)."""
    cfg = job_config(train={"total_steps": 3})
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [json.dumps({"step": s, "reward_mean": 0.5}) + "\n" for s in range(3)]
    (run_dir / "metrics.jsonl").write_text("".join(rows))
    store = CheckpointStore(cfg.checkpoint_dir)
    for step in (1, 2):
        tmp = store.begin(step)
        (tmp / "learner" / "shard.bin").write_bytes(bytes([step]) * 64)
        store.finalize(tmp, step, step + 1)
    monkeypatch.setattr(training, "connect", _refuse_to_start)
    return config, store


def _train(config, *args):
    return CliRunner().invoke(app, ["train", str(config), *args])


def test_a_finished_run_says_it_is_complete_and_starts_nothing(finished):
    config, store = finished
    for resume in ("auto", str(store.list()[-1])):
        result = _train(config, "--resume", resume)
        assert result.exit_code == 0, (result.output, result.exception)
        assert "the run is already complete: 3 of 3 steps trained (step-00000002); nothing to train" in result.output
        assert "raise train.total_steps with --set, e.g. --set train.total_steps=6 --resume auto" in result.output
    fewer = _train(config, "--set", "train.total_steps=2", "--resume", "auto")  # past the end counts too
    assert fewer.exit_code == 0 and "complete: 3 steps trained (step-00000002), train.total_steps is 2; nothing" in fewer.output


def test_a_run_with_steps_left_or_a_damaged_final_checkpoint_goes_on_to_start(finished):
    config, store = finished
    more = _train(config, "--set", "train.total_steps=5", "--resume", "auto")
    assert isinstance(more.exception, _RayStarted) and "complete" not in more.output
    (store.list()[-1] / "learner" / "shard.bin").write_bytes(b"damaged")  # resume falls back to step 1: 1 step left
    damaged = _train(config, "--resume", "auto")
    assert isinstance(damaged.exception, _RayStarted) and "complete" not in damaged.output
    fresh = _train(config, "--overwrite")  # not a resume: the checkpoints are not consulted
    assert isinstance(fresh.exception, _RayStarted)


def test_a_run_of_epochs_is_complete_at_its_own_count_of_steps(finished):
    """With train.total_epochs the last step is the run's steps an epoch (its config.yaml, written as
    it ran) times the epochs asked for now; a run that did not count epochs is not judged here."""
    config, store = finished
    epochs = ["--set", "train.total_epochs=1", "--resume", "auto"]
    unknown = _train(config, *epochs)  # no config.yaml in the run: the job's start counts
    assert isinstance(unknown.exception, _RayStarted) and "complete" not in unknown.output
    run = yaml.safe_load(config.read_text())
    run["train"].update(total_steps=3, total_epochs=1)  # one epoch of 3 steps, as the run recorded it
    (Path(run["run_dir"]) / "config.yaml").write_text(yaml.safe_dump(run))
    done = _train(config, *epochs)
    assert done.exit_code == 0, (done.output, done.exception)
    assert "complete: 3 of 3 steps trained (step-00000002)" in done.output, done.output
    assert "raise train.total_epochs with --set, e.g. --set train.total_epochs=2 --resume auto" in done.output
    more = _train(config, "--set", "train.total_epochs=2", "--resume", "auto")  # 6 steps: 3 left
    assert isinstance(more.exception, _RayStarted) and "complete" not in more.output
    # Counted in steps of another prompts_per_step: the epoch's steps now are not known before the start.
    run["train"]["prompts_per_step"] += 1
    (Path(run["run_dir"]) / "config.yaml").write_text(yaml.safe_dump(run))
    other = _train(config, *epochs)
    assert isinstance(other.exception, _RayStarted) and "complete" not in other.output


def test_the_dry_run_says_what_resume_auto_will_do(finished, tmp_path):
    """Trial 23a M7: `--dry-run --resume auto` said `dry run ok` on a finished run (the real command
    then trains nothing) and on a run without a checkpoint (it starts over)."""
    config, store = finished
    done = _train(config, "--dry-run", "--resume", "auto")
    assert done.exit_code == 0 and "the run is already complete: 3 of 3 steps trained (step-00000002)" in done.output
    for path in store.list():
        for file in sorted(path.rglob("*"), reverse=True):
            file.unlink() if file.is_file() else file.rmdir()
        path.rmdir()
    fresh = _train(config, "--dry-run", "--resume", "auto")
    assert fresh.exit_code == 0 and "dry run ok" in fresh.output, fresh.output
    assert f"--resume auto: no checkpoint in {store.root}: the job starts over" in fresh.output
