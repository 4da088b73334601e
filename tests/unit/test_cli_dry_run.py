"""`rlhf-cluster train CONFIG --dry-run` passes for every shipped config and names what does not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from actors.cli import app

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_passes_the_dry_run(config):
    result = CliRunner().invoke(app, ["train", str(config), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "dry run ok" in result.output


def test_too_many_gpus_fails_with_a_clear_message():
    args = ["train", str(CONFIGS[0]), "--dry-run", "--set", "generation.resources.num_gpus=1", "--set", "generation.replicas=2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "generation pool: each actor needs 1 GPU (generation.resources)" in result.output
    assert "the job needs 2 GPU in all (generation 2 x 1)" in result.output


def test_missing_model_path_fails_the_dry_run(tmp_path):
    result = CliRunner().invoke(app, ["train", str(CONFIGS[0]), "--dry-run", "--set", f"model.path={tmp_path}/nope"])
    assert result.exit_code == 2
    assert "model.path" in result.output and "config.json" in result.output


def test_bad_config_field_is_named():
    result = CliRunner().invoke(app, ["train", str(CONFIGS[0]), "--dry-run", "--set", "train.total_stepz=3"])
    assert result.exit_code == 2
    assert "train.total_stepz" in result.output
