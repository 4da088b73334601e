"""What `load_config` says about a config it cannot use: each message names the file or the dotted
field and what was expected (an empty file, a misspelt key, YAML that does not parse, a name from a
fixed set), and the CLI turns it into `error:` lines and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from actors.commands.cli import app
from rlhf_cluster.config import ConfigError, load_config


def refusal(path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


@pytest.mark.parametrize("text", ["", "\n", "  \n\t\n"], ids=["empty", "blank", "whitespace"])
def test_an_empty_config_file_is_refused_naming_it(text, tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    assert refusal(path).startswith(f"config file {path} is empty: expected a mapping of sections")
    result = CliRunner().invoke(app, ["train", str(path), "--dry-run"])
    assert result.exit_code == 2 and f"error: config file {path} is empty" in result.output, result.output
    assert "dry run ok" not in result.output


def test_an_explicit_empty_mapping_still_means_the_defaults(tmp_path):
    path = tmp_path / "defaults.yaml"
    path.write_text("{}\n")
    assert load_config(path).train.total_steps == load_config(None).train.total_steps


def test_a_yaml_error_names_the_config_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  total_steps: 5\n  prompts_per_step: [1\n")
    message = refusal(path)
    assert message.startswith(f"config file {path} is not valid YAML: while parsing a flow sequence")
    assert f'in "{path}", line 3, column 21' in message and "<unicode string>" not in message


def test_an_override_that_is_no_yaml_is_refused_naming_it():
    message = refusal(overrides=["train.total_steps={a"])
    assert message.startswith("override 'train.total_steps={a': the value is not valid YAML")
    assert 'in "--set train.total_steps={a", line 1, column 3' in message and "<unicode string>" not in message
    result = CliRunner().invoke(app, ["train", "--set", "train.total_steps={a", "--dry-run"])
    assert result.exit_code == 2 and "error: override 'train.total_steps={a'" in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
