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


def _trace_run(tmp_path):
    spans = [{"track": "driver", "kind": "driver", "name": "step", "start": 0.0, "end": 1.0, "args": {"step": 0}}]
    (tmp_path / "trace.jsonl").write_text("".join(json.dumps(s) + "\n" for s in spans))
    return tmp_path


def test_trace_out_names_a_missing_output_folder(tmp_path):
    missing = tmp_path / "missing" / "dir"
    result = CliRunner().invoke(app, ["trace", str(_trace_run(tmp_path)), "--out", str(missing / "t.json")])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: cannot write {missing / 't.json'}: its folder {missing} does not exist"


def test_trace_out_that_is_a_folder_or_under_a_file(tmp_path):
    run = _trace_run(tmp_path)
    result = CliRunner().invoke(app, ["trace", str(run), "--out", str(run)])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: cannot write {run}: Is a directory"
    result = CliRunner().invoke(app, ["trace", str(run), "--out", str(run / "trace.jsonl" / "t.json")])
    assert result.exit_code == 2, result.output
    assert result.output.strip().endswith(f"its folder {run / 'trace.jsonl'} is not a folder")


def test_trace_out_missing_folder_in_a_real_process(tmp_path):
    """The installed command itself: one line on stderr, exit code 2, no `[Errno 2]`, no traceback."""
    import subprocess
    import sys
    from pathlib import Path

    cli = Path(sys.executable).parent / "rlhf-cluster"
    missing = tmp_path / "missing" / "dir"
    done = subprocess.run(
        [str(cli), "trace", str(_trace_run(tmp_path)), "--out", str(missing / "t.json")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"error: cannot write {missing / 't.json'}: its folder {missing} does not exist"
    assert done.stdout == ""
