"""The whole loop learns, in `make test`'s time: generation -> scoring -> learner -> weights ->
generation raise a reward that any model can learn in a few steps.

A random tiny model, the positive-control reward `digit_share` (the share of digits in the
response, `rlhf_cluster/rewards/controls.py`), 20 GRPO steps at lr 1e-2, seed 0. A broken link
anywhere (advantages of the wrong sign, a loss that does not reach the weights, weights that do
not reach the engines, log-probs of the wrong tokens) leaves the reward where it started. The
demo's held-out accuracy after 240 steps (`test_demo_learns.py`) is the slow, task-level check.

How MARGIN was chosen (`.venv/bin/python benchmarks/strong_signal_spread.py`, seeds 0-4, on an
AMD EPYC whose own kernels are AVX2, and under ATEN_CPU_CAPABILITY=default, the scalar kernels;
2026-11-26): the mean reward of the last 4 steps minus that of the first 4 rose by +0.79 to +0.89
(AVX2) and +0.83 to +0.93 (scalar); the first 4 steps' mean was 0.04-0.09 in every run. The job
runs ahead of the learner (max_staleness 1), so a rerun at one seed follows another trajectory:
at 16 steps one seed's rise took off late (+0.20 in one run, +0.48 in another), which is why the
test runs 20. MARGIN = 0.4 is half the smallest rise measured.
"""

from __future__ import annotations

import statistics

import pytest

pytestmark = pytest.mark.learning

MARGIN = 0.4
WINDOW = 4


def test_a_short_run_raises_a_reward_any_model_can_learn(ray_cluster, job_config):
    cfg = job_config(
        name="strong-signal",
        scoring={"rewards": [{"type": "function", "function": "rlhf_cluster.rewards.controls:digit_share"}]},
        learner={"world_size": 1, "lr": 1e-2},
        train={"total_steps": 20, "prompts_per_step": 4, "max_staleness": 1, "progress": False},
    )
    from actors.job import run_job

    rows = run_job(cfg).rows
    rewards = [r["reward_mean"] for r in rows]
    first, last = statistics.mean(rewards[:WINDOW]), statistics.mean(rewards[-WINDOW:])
    print(f"reward: first {WINDOW} steps {first:.3f}, last {WINDOW} {last:.3f}: {[round(x, 2) for x in rewards]}")
    assert first < 0.2, f"the random model already writes digits ({first:.3f}): the rise checks nothing"
    assert last - first >= MARGIN, f"the reward rose by {last - first:+.3f}, less than {MARGIN}: {rewards}"
