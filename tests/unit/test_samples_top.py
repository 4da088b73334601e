"""`rlhf-cluster samples RUN --top N`: a negative N is refused (exit code 2, naming --top); 0 keeps
only the random picks."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from actors.commands.cli import app


def _sample(pick: str, reward: float) -> dict:
    return {"step": 0, "pick": pick, "reward": reward, "reward_components": {}, "response_len": 1,
            "finish_reason": "stop", "policy_version": 0, "sample_id": f"{pick}-0", "prompt": "p", "response": "r"}


def _run(tmp_path, *args: str):
    rows = [_sample("top", 1.0), _sample("bottom", -1.0), _sample("random", 0.0)]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return CliRunner().invoke(app, ["samples", str(tmp_path), *args], env={"COLUMNS": "80"})


def test_a_negative_top_is_refused(tmp_path):
    result = _run(tmp_path, "--top", "-2")
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--top'" in result.output and "greater than or equal to 0" in result.output


def test_top_zero_keeps_only_the_random_picks(tmp_path):
    result = _run(tmp_path, "--top", "0")
    assert result.exit_code == 0, result.output
    assert "| random |" in result.output and "| top |" not in result.output and "| bottom |" not in result.output
