"""`rlhf-cluster --help` at 80 columns: each command's summary is one reflowed paragraph (a
docstring's hard line breaks do not survive into it), each command's own `--help` still shows its
full text, every argument says what it is, and a default config is shown relative to the repository
(the file loaded is still the repository's)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from actors.commands.cli import app

REPO = Path(__file__).resolve().parents[2]
COMMANDS = [info.name or info.callback.__name__ for info in app.registered_commands]


def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert result.exit_code == 0, result.output
    return result.output


def _summaries(output: str) -> dict[str, list[str]]:
    """Each command's summary lines in the Commands panel of `--help`."""
    panel = output.split("Commands")[1].split("╰")[0].splitlines()[1:]
    rows: dict[str, list[str]] = {}
    name = ""
    for line in panel:
        content = line.strip().strip("│").rstrip()
        match = re.match(r" (\S+)(\s+)(.*)", content)
        if match and match.group(1) in COMMANDS:
            name, column = match.group(1), len(match.group(1)) + len(match.group(2)) + 1
            rows[name] = [match.group(3)]
        else:
            rows[name].append(content[column:].strip())
    return rows


def test_each_summary_is_one_reflowed_paragraph():
    rows = _summaries(_help())
    assert set(rows) == set(COMMANDS)
    width = max(len(line) for lines in rows.values() for line in lines)  # at most the column's width
    for name, lines in rows.items():
        for line, following in zip(lines, lines[1:]):
            # a line ends early only where the next word does not fit on it
            assert len(line) + 1 + len(following.split()[0]) > width, f"{name}: {lines}"
    assert " ".join(rows["status"]).startswith(
        "Print a submitted job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED); for a run directory, "
    ), rows["status"]


@pytest.mark.parametrize("name", COMMANDS)
def test_each_commands_help_shows_its_full_text(name):
    info = next(i for i in app.registered_commands if (i.name or i.callback.__name__) == name)
    doc = " ".join(inspect.getdoc(info.callback).split())
    shown = " ".join(_help(name).split())
    assert doc in shown, shown


def test_gateway_config_has_a_description():
    assert "YAML job config" in _help("gateway").split("Arguments")[1].split("Options")[0]


@pytest.mark.parametrize(
    ("name", "shown"),
    [("train", "configs/demo.yaml"), ("gateway", "configs/demo.yaml"), ("pipeline", "configs/three_stage.yaml")],
)
def test_default_config_is_shown_relative_and_loaded_absolute(name, shown):
    output = _help(name)
    assert shown in output and str(REPO) not in output, output
    command = typer.main.get_command(app).commands[name]
    (config,) = [p for p in command.params if p.name == "config"]
    assert config.default == REPO / shown
