"""The whole loop learns, in `make test`'s time: generation -> scoring -> learner -> weights ->
generation raise a reward that any model can learn in a few steps.

A random tiny model, the positive-control reward `digit_share` (the share of digits in the
response, `rlhf_cluster/rewards/controls.py`), 20 GRPO steps of 8 prompts x 8 samples at lr 1e-2,
seed 0. A broken link
anywhere (advantages of the wrong sign, a loss that does not reach the weights, weights that do
not reach the engines, log-probs of the wrong tokens) leaves the reward where it started. The
demo's held-out accuracy after 240 steps (`test_demo_learns.py`) is the slow, task-level check.

How MARGIN was chosen (`.venv/bin/python -m benchmarks.strong_signal_spread --capabilities native
default`, seeds 0-4, on an AMD EPYC whose own kernels are AVX2, and with the scalar kernels;
2026-11-26): the mean reward of the last 4 steps minus that of the first 4 rose by +0.924 to
+0.943 (AVX2) and +0.930 to +0.941 (scalar); the first 4 steps' mean was 0.05-0.07 in every run.
The job runs ahead of the learner (max_staleness 1), so a rerun at one seed follows another
trajectory. With 4 prompts x 4 samples per step the rise was +0.79 to +0.93 in those runs but
+0.32 once in a full `make test` (a late take-off under load), so the step's batch was made 4x
larger: the curve is smooth, near 1.0 from step 15. MARGIN = 0.4 is under half the smallest rise.
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
        generation={"replicas": 1, "prompts_per_request": 2, "sampling": {"n": 8, "max_new_tokens": 8}},
        scoring={"rewards": [{"type": "function", "function": "rlhf_cluster.rewards.controls:digit_share"}]},
        learner={"world_size": 1, "lr": 1e-2},
        train={"total_steps": 20, "prompts_per_step": 8, "max_staleness": 1, "progress": False},
    )
    from actors.job import run_job

    rows = run_job(cfg).rows
    rewards = [r["reward_mean"] for r in rows]
    first, last = statistics.mean(rewards[:WINDOW]), statistics.mean(rewards[-WINDOW:])
    print(f"reward: first {WINDOW} steps {first:.3f}, last {WINDOW} {last:.3f}: {[round(x, 2) for x in rewards]}")
    assert first < 0.2, f"the random model already writes digits ({first:.3f}): the rise checks nothing"
    assert last - first >= MARGIN, f"the reward rose by {last - first:+.3f}, less than {MARGIN}: {rewards}"
