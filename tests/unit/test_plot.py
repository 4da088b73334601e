"""`rlhf-cluster plot RUN_DIR` writes a PNG from the run's metrics, and names a bad run dir."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from actors.commands.cli import app
from rlhf_cluster.telemetry.plotting import _draw_evaluation as _real_draw


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


def test_plot_draws_the_held_out_reward_where_no_accuracy_is_measured(tmp_path, monkeypatch):
    """A reward that says no answer right (a function returning a number) has eval_reward_mean and
    no eval_accuracy: the held-out panel draws the reward (trial 23a B3)."""
    from rlhf_cluster.telemetry import plotting

    rows = [{"step": s, "reward_mean": 0.1 * s, "kl": 0.01 * s, "response_len_mean": 4.0} for s in range(5)]
    rows[2].update(eval_reward_mean=0.4, eval_sampled_reward_mean=0.35)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "eval.json").write_text(json.dumps({"accuracy_before": None, "reward_before": 0.1, "reward_after": 0.6}))
    drawn = []  # the held-out panel's axes, kept to read back
    monkeypatch.setattr(plotting, "_draw_evaluation", lambda ax, *a: drawn.append(_real_draw(ax, *a) or ax))
    result = CliRunner().invoke(app, ["plot", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (ax,) = drawn
    assert ax.get_title() == "held-out reward (mean)"
    assert [list(line.get_ydata()) for line in ax.get_lines()] == [[0.1, 0.4, 0.6], [0.35]]


def test_plot_names_a_directory_without_metrics(tmp_path):
    result = CliRunner().invoke(app, ["plot", str(tmp_path)])
    assert result.exit_code == 2
    assert "metrics.jsonl does not exist" in result.output
