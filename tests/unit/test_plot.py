"""`rlhf-cluster plot RUN_DIR` writes a PNG from the run's metrics, and names a bad run dir."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from actors.commands.cli import app


def test_plot_writes_a_png(tmp_path):
    rows = [{"step": s, "reward_mean": 0.1 * s, "kl": 0.01 * s, "response_len_mean": 4.0} for s in range(5)]
    rows[4].update(response_len_p90=6.0, distinct_2=0.5, busy_generation=0.9, eval_accuracy=0.4, **{"eval_pass@4": 0.7})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "eval.json").write_text(json.dumps({"accuracy_before": 0.3, "accuracy_after": 0.5}))
    result = CliRunner().invoke(app, ["plot", str(tmp_path)])
    assert result.exit_code == 0, result.output
    png = (tmp_path / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not list(tmp_path.glob(".*")), "temp file left behind"


def test_plot_names_a_directory_without_metrics(tmp_path):
    result = CliRunner().invoke(app, ["plot", str(tmp_path)])
    assert result.exit_code == 2
    assert "metrics.jsonl does not exist" in result.output
