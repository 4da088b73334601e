"""`sft`, `train-rm` and `pipeline` refuse, before any work (no training, no Ray), to replace what
an earlier run left: a stage's model folder, or for `pipeline` also the RL stage's earlier run in
run_dir; one line naming it and the flag, exit code 2. `--overwrite` moves it aside to
RUN_DIR.old-<time> (as `train --overwrite` does), `--overwrite=delete` deletes it; a first run
is unaffected. The stages' training and the RL job are faked; the run directory and its stage
folders are real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import actors.commands.stages as stages
import actors.commands.supervised as supervised
import actors.job
from actors.commands.cli import app
from actors.reporting import JobResult
from rlhf_cluster.run.run_dir import RunDir

THREE_STAGE = str(Path(__file__).resolve().parents[2] / "configs" / "three_stage.yaml")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """The stages and the RL job faked (each writes what the real one does, with a marker: the
    number of the call), Ray never started; `fake.calls` lists what ran."""

    class Fake:
        calls: list[str] = []
        run_dir = tmp_path / "runs" / "three_stage"

        def args(self, command: str, *extra: str) -> list[str]:
            return [command, THREE_STAGE, "--set", f"run_dir={self.run_dir}", "--set", "train.progress=false", *extra]

    f = Fake()
    f.calls = []

    def run_stage(cfg, kind, model_path, progress=True):
        f.calls.append(kind)
        out = cfg.stage_output(kind)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text("{}")
        summary = {"stage": kind, "first_loss": 1.0, "final_loss": 0.5, "output": str(out), "call": len(f.calls)}
        (out / "stage.json").write_text(json.dumps(summary))
        return summary

    def run_job(cfg, resume=None, stop=None, overwrite=False):
        f.calls.append("rl")
        run = RunDir(cfg.run_dir, cfg.weights_dir, cfg.checkpoint_dir).prepare(True, cfg.name, overwrite)
        run.append(RunDir.METRICS, [{"step": 0, "reward_mean": 0.5, "call": len(f.calls)}])
        run.release()
        return JobResult(rows=[{"step": 0, "reward_mean": 0.5}], run_dir=str(cfg.run_dir))

    monkeypatch.setattr(supervised, "run_stage", run_stage)
    monkeypatch.setattr(actors.job, "run_job", run_job)
    monkeypatch.setattr(stages, "base_model", lambda cfg: "base")
    monkeypatch.setattr(stages, "connect", lambda *a, **k: f.calls.append("ray"))
    return f


def _call(folder: Path) -> int:
    return json.loads((folder / "stage.json").read_text())["call"]


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_a_first_pipeline_runs_every_stage_and_a_second_is_refused_before_any_work(fake):
    first = CliRunner().invoke(app, fake.args("pipeline"))
    assert first.exit_code == 0, first.output
    assert fake.calls == ["ray", "sft", "reward_model", "rl"]
    assert not list(fake.run_dir.parent.glob("*.old-*"))

    again = CliRunner().invoke(app, fake.args("pipeline", "--set", "sft.steps=10"))
    line = _one_error_line(again)
    assert f"the SFT model {fake.run_dir / 'sft'}" in line and f"the reward model {fake.run_dir / 'reward_model'}" in line
    assert f"the RL stage's run in {fake.run_dir}" in line
    assert "start over with --overwrite (moves them aside to three_stage.old-<time>; --overwrite=delete deletes them)" in line
    assert fake.calls == ["ray", "sft", "reward_model", "rl"], "nothing trained, Ray not started"
    assert _call(fake.run_dir / "sft") == 2 and _call(fake.run_dir / "reward_model") == 3


def test_pipeline_refuses_an_earlier_rl_run_alone(fake):
    run = RunDir(fake.run_dir, fake.run_dir / "weights", fake.run_dir / "checkpoints").acquire("rl")
    run.append(RunDir.METRICS, [{"step": 0}])
    run.release()
    line = _one_error_line(CliRunner().invoke(app, fake.args("pipeline")))
    assert f"the RL stage's run in {fake.run_dir} (metrics, checkpoints); start over with --overwrite" in line
    assert fake.calls == []


@pytest.mark.parametrize("mode", ["aside", "delete"])
def test_pipeline_overwrite_sets_the_whole_earlier_run_aside_or_deletes_it(fake, mode):
    assert CliRunner().invoke(app, fake.args("pipeline")).exit_code == 0
    result = CliRunner().invoke(app, fake.args("pipeline", f"--overwrite={mode}"))
    assert result.exit_code == 0, result.output
    assert fake.calls == ["ray", "sft", "reward_model", "rl"] * 2
    assert _call(fake.run_dir / "sft") == 6 and _call(fake.run_dir / "reward_model") == 7
    assert [r["call"] for r in RunDir(fake.run_dir, Path(), Path()).read(RunDir.METRICS)] == [8]
    old = list(fake.run_dir.parent.glob("three_stage.old-*"))
    if mode == "delete":
        assert old == [] and "deleted the earlier run's output" in result.output
        return
    assert len(old) == 1, "one place for the whole earlier run"
    assert _call(old[0] / "sft") == 2 and _call(old[0] / "reward_model") == 3
    assert [r["call"] for r in RunDir(old[0], Path(), Path()).read(RunDir.METRICS)] == [4]
    assert f"moved the earlier run's output aside to {old[0]}" in result.output


@pytest.mark.parametrize(("command", "kind", "label"), [("sft", "sft", "the SFT model"),
                                                       ("train-rm", "reward_model", "the reward model")])
def test_a_stage_refuses_to_replace_its_output_and_overwrite_moves_it_aside(fake, command, kind, label):
    first = CliRunner().invoke(app, fake.args(command))
    assert first.exit_code == 0, first.output
    assert fake.calls == ["ray", kind] and _call(fake.run_dir / kind) == 2

    line = _one_error_line(CliRunner().invoke(app, fake.args(command, "--set", f"{kind}.steps=10")))
    assert line == (
        f"error: an earlier run's output exists: {label} {fake.run_dir / kind}; start over with --overwrite "
        "(moves it aside to three_stage.old-<time>; --overwrite=delete deletes it)"
    )
    assert fake.calls == ["ray", kind], "nothing trained, Ray not started"

    result = CliRunner().invoke(app, fake.args(command, "--overwrite=aside"))
    assert result.exit_code == 0, result.output
    [old] = fake.run_dir.parent.glob("three_stage.old-*")
    assert _call(old / kind) == 2 and _call(fake.run_dir / kind) == 4

    result = CliRunner().invoke(app, fake.args(command, "--overwrite=delete"))
    assert result.exit_code == 0, result.output
    assert list(fake.run_dir.parent.glob("three_stage.old-*")) == [old] and _call(fake.run_dir / kind) == 6


def test_sft_refuses_to_replace_the_reference_model_of_an_rl_run(fake):
    assert CliRunner().invoke(app, fake.args("pipeline")).exit_code == 0
    line = _one_error_line(CliRunner().invoke(app, fake.args("sft", "--set", "sft.steps=10")))
    assert f"the SFT model {fake.run_dir / 'sft'}; start over with --overwrite" in line
    assert _call(fake.run_dir / "sft") == 2


def test_train_rm_on_a_run_with_only_an_sft_model_is_a_first_run(fake):
    assert CliRunner().invoke(app, fake.args("sft")).exit_code == 0
    result = CliRunner().invoke(app, fake.args("train-rm"))
    assert result.exit_code == 0, result.output
    assert fake.calls == ["ray", "sft", "ray", "reward_model"] and _call(fake.run_dir / "sft") == 2


def test_a_bad_overwrite_value_is_refused_like_train(fake):
    line = _one_error_line(CliRunner().invoke(app, fake.args("sft", "--overwrite=bogus")))
    assert "--overwrite=bogus: expected --overwrite (moves the earlier run aside) or --overwrite=delete" in line
    assert fake.calls == []


def test_a_bare_overwrite_moves_aside(fake):
    assert CliRunner().invoke(app, fake.args("sft")).exit_code == 0
    result = CliRunner().invoke(app, fake.args("sft", "--overwrite"))
    assert result.exit_code == 0, result.output
    assert len(list(fake.run_dir.parent.glob("three_stage.old-*"))) == 1


@pytest.mark.parametrize("command", ["sft", "pipeline"])
def test_an_input_error_in_a_stage_is_one_line_and_debug_shows_its_traceback(fake, monkeypatch, command):
    """As `train` does: a stage's error caused by input (its data file, here) ends the command in
    one line, and a second naming `--debug`, which keeps the traceback."""

    def bad_data(cfg, kind, model_path, progress=True):
        raise ValueError(f"{kind}.data: /nowhere/pairs.jsonl: no such file")

    monkeypatch.setattr(supervised, "run_stage", bad_data)
    refused = CliRunner().invoke(app, fake.args(command))
    assert refused.exit_code == 2 and refused.exception is not None and "Traceback" not in refused.output
    assert refused.output.strip().splitlines() == [
        "error: sft.data: /nowhere/pairs.jsonl: no such file", "(the full traceback: the same command with --debug)"
    ]
    shown = CliRunner().invoke(app, fake.args(command, "--debug", "--overwrite=delete"))
    assert isinstance(shown.exception, ValueError) and "sft.data" in str(shown.exception)
