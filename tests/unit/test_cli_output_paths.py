"""A picture written into a folder that does not exist (`plot --out`, `trace --png`) is refused with
one line naming that folder, not the PNG's temp file, and no traceback (exit code 2)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from actors.commands.cli import app


def test_plot_names_a_missing_output_folder(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "reward_mean": 0.1}) + "\n")
    missing = tmp_path / "no" / "dir"
    result = CliRunner().invoke(app, ["plot", str(tmp_path), "--out", str(missing / "x.png")])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: cannot write {missing / 'x.png'}: its folder {missing} does not exist"


def test_plot_names_an_output_folder_that_is_a_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "reward_mean": 0.1}) + "\n")
    result = CliRunner().invoke(app, ["plot", str(tmp_path), "--out", str(tmp_path / "metrics.jsonl" / "x.png")])
    assert result.exit_code == 2, result.output
    assert result.output.strip().endswith(f"its folder {tmp_path / 'metrics.jsonl'} is not a folder")


def test_trace_png_names_a_missing_output_folder(tmp_path):
    spans = [{"track": "driver", "kind": "driver", "name": "step", "start": 0.0, "end": 1.0, "args": {"step": 0}}]
    (tmp_path / "trace.jsonl").write_text("".join(json.dumps(s) + "\n" for s in spans))
    missing = tmp_path / "no"
    result = CliRunner().invoke(app, ["trace", str(tmp_path), "--png", str(missing / "t.png")])
    assert result.exit_code == 2, result.output
    expected = f"error: cannot write {missing / 't.png'}: its folder {missing} does not exist"
    assert result.output.strip().endswith(expected), result.output
