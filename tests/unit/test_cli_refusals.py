"""Refused input ends a command with one `error: ...` line and exit code 2, never a traceback
(`actors.commands.common.refuse`), whichever command refuses it."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from actors.commands.cli import app

DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["status", "no-such-job"], "'no-such-job' is not a run directory (a submitted job's id needs --address)"),
        (["samples", "{empty}"], "samples.jsonl: no samples logged (is this a run directory?)"),
        (["plot", "{empty}"], "metrics.jsonl does not exist"),
        (["train", DEMO, "--overwrite=bogus"], "--overwrite=bogus: expected --overwrite"),
        (["sft", DEMO], "has no `sft` section (see configs/three_stage.yaml)"),
        (["gateway", DEMO, "--host", "0.0.0.0"], "--host 0.0.0.0 is reachable from other machines: set --token"),
    ],
    ids=["status", "samples", "plot", "train", "sft", "gateway"],
)
def test_refused_input_is_one_error_line_and_exit_2(args, message, tmp_path):
    result = CliRunner().invoke(app, [a.format(empty=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert "Traceback" not in result.output
