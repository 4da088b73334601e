"""A stopped `rlhf-cluster train` says how to continue: the printed command carries every `--set`
the user gave (quoted for a shell), so it resumes the same run_dir, not the config file's."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml
from typer.testing import CliRunner

import actors.commands.training as training
import actors.job
from actors.commands.cli import app
from actors.reporting import JobResult
from rlhf_cluster.config import load_config


def _continue_command(output: str) -> list[str]:
    [line] = [x for x in output.splitlines() if "continue with: " in x]
    return shlex.split(line.split("continue with: ", 1)[1])


def test_a_stopped_run_prints_a_command_that_resumes_the_same_run(job_config, tmp_path, monkeypatch):
    cfg = job_config()
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    run_dir = tmp_path / "my runs" / "it's here"  # a space and a quote: the shell must get them whole
    monkeypatch.setattr(training, "connect", lambda *a, **k: None)
    seen = []

    def stopped_job(cfg, resume, stop, overwrite):
        seen.append(cfg)
        return JobResult(rows=[{"step": 0, "reward_mean": 0.5}, {"step": 1, "reward_mean": 0.5}], stopped=True)

    monkeypatch.setattr(actors.job, "run_job", stopped_job)
    sets = [f"run_dir={run_dir}", "train.total_steps=7"]
    result = CliRunner().invoke(app, ["train", str(config), *(w for s in sets for w in ("--set", s))])
    assert result.exit_code == 0, result.output
    assert "stopped after 2 of 7 steps, with a checkpoint" in result.output  # a count: its last step is 1
    words = _continue_command(result.output)
    assert words[:3] == ["rlhf-cluster", "train", str(config)] and words[-2:] == ["--resume", "auto"]
    assert "--address" not in words
    given = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    assert given == sets
    again = load_config(Path(words[2]), given)  # what the printed command would run: the same run, the same length
    assert again.run_dir == seen[0].run_dir == str(run_dir) and again.train.total_steps == 7


def test_the_command_keeps_the_address_given_and_quotes_every_word():
    command = training._resume_command(Path("my job.yaml"), ["name=a b", "seed=1"], "10.0.0.1:6379")
    assert command == ("rlhf-cluster train 'my job.yaml' --set 'name=a b' --set seed=1 --address 10.0.0.1:6379 "
                       "--resume auto")
    assert training._resume_command(Path("job.yaml"), [], None) == "rlhf-cluster train job.yaml --resume auto"
