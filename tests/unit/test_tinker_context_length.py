"""`rlhf-cluster tinker`: the shipped config's tiny model is long enough for its context (vLLM
refused max_model_len 512 over a 256-position model only once the actors started), a longer
context than the model folder accepts is refused in one line before anything starts, and a
stopped server says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from actors.commands.cli import app
from rlhf_cluster.config.base import ConfigError
from rlhf_cluster.config.loading import load_model
from rlhf_cluster.config.inputs import folder_max_length
from rlhf_cluster.config.tinker import TinkerConfig, check_context_length
from rlhf_cluster.models.tiny_model import ensure_tiny_model

SHIPPED = Path(__file__).resolve().parents[2] / "configs" / "tinker" / "server.yaml"
TOKEN = "tml-abcdefabcdefabcdef"


def test_shipped_config_builds_a_tiny_model_long_enough(model_cache):
    cfg = load_model(TinkerConfig, SHIPPED, [])
    folder = ensure_tiny_model(cfg.model.tiny, model_cache)
    assert folder_max_length(folder) >= cfg.model.max_context_length == 512
    check_context_length(cfg.model, folder)  # no refusal


def test_tiny_length_follows_the_context_unless_set():
    longer = load_model(TinkerConfig, SHIPPED, ["model.max_context_length=2048"])
    assert longer.model.tiny.max_position_embeddings == 2048
    shorter = load_model(TinkerConfig, SHIPPED, ["model.max_context_length=64"])
    assert shorter.model.tiny.max_position_embeddings == 256  # never below the tiny model's default
    pinned = load_model(TinkerConfig, SHIPPED, ["model.tiny.max_position_embeddings=300"])
    assert pinned.model.tiny.max_position_embeddings == 300
    again = TinkerConfig.model_validate(longer.model_dump())
    assert again.model.tiny == longer.model.tiny


def test_context_longer_than_the_folder_is_refused(tiny_model_path):
    cfg = load_model(TinkerConfig, SHIPPED, [f"model.path={tiny_model_path}"])
    with pytest.raises(ConfigError) as err:
        check_context_length(cfg.model, tiny_model_path)
    assert str(err.value).startswith("model.max_context_length: 512 ")
    assert tiny_model_path in str(err.value) and "max_position_embeddings 256" in str(err.value)


def test_limit_read_from_a_text_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 128}}))
    assert folder_max_length(tmp_path) == 128
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x"}))
    assert folder_max_length(tmp_path) is None
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json does not read as JSON"):
        folder_max_length(tmp_path)


def test_cli_refuses_in_one_line_before_ray(tiny_model_path, monkeypatch):
    import actors.workers.tinker as worker

    monkeypatch.setenv("RLHF_TINKER_TOKEN", TOKEN)
    monkeypatch.setattr(worker, "serve", lambda *a, **k: pytest.fail("the server started"))
    args = ["tinker", str(SHIPPED), "--set", f"model.path={tiny_model_path}", "--set", "model.max_context_length=1024"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.max_context_length: 1024 "), result.output
    assert "max_position_embeddings 256" in lines[0] and "Traceback" not in result.output


def test_cli_says_when_the_server_stopped(tiny_model_path, monkeypatch, tmp_path):
    import actors.workers.tinker as worker

    monkeypatch.setenv("RLHF_TINKER_TOKEN", TOKEN)
    monkeypatch.setattr(worker, "serve", lambda cfg, on_ready: on_ready("http://127.0.0.1:1"))  # returns as on SIGINT
    state = tmp_path / "states"
    args = ["tinker", str(SHIPPED), "--set", f"model.path={tiny_model_path}", "--set", "model.max_context_length=256"]
    result = CliRunner().invoke(app, [*args, "--set", f"state_dir={state}"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == f"tinker: stopped; saved states stay in {state}"


def test_cli_ctrl_c_while_starting_is_no_traceback(tiny_model_path, monkeypatch):
    import actors.workers.tinker as worker

    def interrupted(cfg, on_ready):
        raise KeyboardInterrupt

    monkeypatch.setenv("RLHF_TINKER_TOKEN", TOKEN)
    monkeypatch.setattr(worker, "serve", interrupted)
    args = ["tinker", str(SHIPPED), "--set", f"model.path={tiny_model_path}", "--set", "model.max_context_length=256"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130, result.output
    assert result.output.strip() == "tinker: stopped while starting; saved states stay in runs/tinker"
