"""A job on a user's prompt file whose reward function takes the prompt, its source and the row's
`data.columns.extra` columns: every response's call, in the reward workers of training and of the
held-out evaluation, gets its own row's values (the function raises otherwise, and `on_error:
fail` ends the job). The function is an `async def` run three calls at a time
(`concurrency`). The signature, the columns and their path are unit-tested in
tests/unit/test_reward_context.py, the concurrency in tests/unit/test_reward_concurrency.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from actors.job import Job

REPO = Path(__file__).resolve().parents[2]
# Imported by the reward workers too: Ray puts the driver's working directory (the repo) on their path.
REWARD = "tests.integration.test_reward_context_job:checks_its_context"
STEPS = 2


async def checks_its_context(
    response: str, answer: str, *, prompt: str, source: str | None, extra: dict, prompt_id: str
):
    await asyncio.sleep(0)  # a verifier's service called without blocking
    expected = ("even" if extra["level"] % 2 == 0 else "odd", f"q{extra['level']}", str(extra["level"] + 1))
    got = (source, extra["tests"]["key"], answer)
    if got != expected or extra["question"] not in prompt or prompt_id != expected[1]:
        raise AssertionError(f"{prompt_id}: got {(source, extra, answer, prompt)!r}, expected {expected}")
    return {"reward": min(len(set(response)), 10) / 10, "correct": float(response.strip() == answer)}


def test_a_reward_function_gets_each_rows_prompt_source_and_extra_columns(ray_cluster, job_config, monkeypatch,
                                                                          tmp_path):
    monkeypatch.syspath_prepend(str(REPO))  # preflight imports the reward function in this process
    assert Path.cwd() == REPO, "run from the repo root: the reward workers import this module from there"
    rows = [{"prompt_id": f"q{i}", "question": f"{i}+1=", "answer": str(i + 1), "origin": ["even", "odd"][i % 2],
             "tests": {"key": f"q{i}"}, "level": i} for i in range(40)]  # fmt: skip
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    columns = {"prompt": "question", "source": "origin", "extra": ["tests", "level", "question"]}
    cfg = job_config(
        name="reward-context",
        data={"path": str(path), "columns": columns, "eval_fraction": 0.2, "eval_prompts": 8},
        scoring={"rewards": [{"type": "function", "function": REWARD, "on_error": "fail", "concurrency": 3}]},
        train={"total_steps": STEPS, "prompts_per_step": 2, "max_staleness": 1, "progress": False},
    )
    with Job(cfg) as job:
        result = job.run()
    assert [r["step"] for r in result.rows] == list(range(STEPS)), "the job trained every step"
    per_source = {k for k in result.evaluation_after if k.startswith("eval_accuracy/")}
    assert per_source and per_source <= {"eval_accuracy/even", "eval_accuracy/odd"}, result.evaluation_after
