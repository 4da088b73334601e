"""Issue 34's silent livelock, for real: a reward function that fails on about a third of its calls
(NaN on every 5th, inf on every 7th) with the default `on_error: drop`, groups of 8. Before, every
group held a failure and was dropped whole, and the job spun forever without a step. Now each
failed sample is dropped alone, the groups keep the rest, and the job trains to its last step
(the stop above `max_failure_fraction` and the no-progress watchdog are unit-tested:
tests/unit/test_rewards.py, tests/unit/test_job_state.py)."""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import pytest

from actors.job import Job
from rlhf_cluster.run.run_dir import RunDir

REPO = Path(__file__).resolve().parents[2]
# Imported by the reward workers too: Ray puts the driver's working directory (the repo) on their path.
REWARD = "tests.integration.test_failing_reward:nan_or_inf_sometimes"
STEPS = 3
_calls = itertools.count(1)  # per reward worker process


def nan_or_inf_sometimes(response: str, answer: str) -> float:
    n = next(_calls)
    if n % 5 == 0:
        return math.nan
    if n % 7 == 0:
        return math.inf
    return 1.0 if response.strip() == answer else min(len(set(response)), 10) / 10


# `slow` (issue 68's time): a group keeping its good samples when some fail is unit-tested
# (tests/unit/test_job_state.py) and trained in a job by tests/integration/test_agent_gateway.py's
# misbehaving agents (the same `failed` branch of the driver); a reward function failing in a job,
# with its `reward_failed` rows in events.jsonl, is tests/integration/test_stop_and_resume.py's.
@pytest.mark.slow
def test_a_reward_failing_on_a_third_of_calls_trains_on_the_samples_that_kept_a_reward(ray_cluster, job_config,
                                                                                        monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # preflight imports the reward function in this process
    assert Path.cwd() == REPO, "run from the repo root: the reward workers import this module from there"
    cfg = job_config(
        name="failing-reward",
        generation={"replicas": 1, "prompts_per_request": 2, "sampling": {"n": 8, "max_new_tokens": 8}},
        scoring={"rewards": [{"type": "function", "function": REWARD}]},  # on_error: drop, the default
        train={"total_steps": STEPS, "prompts_per_step": 2, "max_staleness": 1, "progress": False},
        faults={"progress_timeout_s": 300},  # were it to spin, it would say so in 5 minutes, not hang
    )
    start = time.monotonic()
    with Job(cfg) as job:
        result = job.run()
    rows = result.rows
    assert [r["step"] for r in rows] == list(range(STEPS)), "the job trained every step"
    assert all(math.isfinite(r["reward_mean"]) for r in rows)
    failed = rows[-1]["dropped_reward_failed"]
    assert failed > 0, "no reward failed: the test tested nothing"
    # Groups kept their good samples: fewer than 8 per group reached the learner, never fewer than 2.
    per_step = [[c for c in result.consumed if c.step == s] for s in range(STEPS)]
    assert all(2 * cfg.train.prompts_per_step <= len(s) <= cfg.samples_per_step for s in per_step)
    assert sum(map(len, per_step)) < STEPS * cfg.samples_per_step
    # Each failure is on record in events.jsonl (a row per rollout request and worker, the soak's detection).
    events = [e for e in RunDir(cfg.run_dir, cfg.weights_dir, cfg.checkpoint_dir).read(RunDir.EVENTS)
              if e.get("event") == "reward_failed"]
    assert sum(e["samples"] for e in events) >= failed and all(e["worker"] for e in events), events
    print(f"{STEPS} steps in {time.monotonic() - start:.0f} s; {failed} samples dropped for a failed reward; "
          f"{[len(s) for s in per_step]} samples trained per step")
