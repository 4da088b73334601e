"""Every algorithm preset (the real registry, rlhf_cluster/algorithms/presets.py) runs real pipeline
steps, reports the diagnostics users watch, and shows the behaviour its settings promise.

The job is built so each promise is decided, not left to chance: every response runs to
`max_new_tokens` (`ignore_eos`), so the overlong filter takes every sample out of the loss, and
the reward (`parity_reward`) gives no signal at all to prompts with an even answer, so dynamic
sampling must drop exactly those groups. What a preset promises is read from its resolved config,
so a new preset is checked by the same rules without touching this file.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from actors.job import Job
from rlhf_cluster.algorithms.presets import PRESETS
from rlhf_cluster.data.prompts import read_prompt_file

REPO = Path(__file__).resolve().parents[2]
# Imported by the reward workers too: Ray puts the driver's working directory (the repo) on their path.
REWARD = "tests.integration.test_presets:parity_reward"

# Settings some presets run with here, to exercise more of the correction and KL code.
EXTRA = {
    # GSPO with geometric-mean MIS exercises the mask mode and its lower bound.
    "gspo": {"correction": {"level": "geometric", "mode": "mask", "cap": 2.0, "lower": 0.5}},
    "rloo": {"kl": {"controller": "adaptive", "target": 1.0, "horizon": 100}},
    "reinforce_pp": {"correction": {"level": "sequence", "mode": "truncate", "cap": 2.0}},
}

REQUIRED = ["kl", "policy/clip_frac_low", "policy/clip_frac_high", "policy/approx_kl", "policy/entropy", "policy/loss",
            "learner/grad_norm", "correction/ess", "correction/mismatch_k1", "correction/mismatch_k3", "reward_mean",
            "kl_coef"]
STEPS = 3


def parity_reward(response: str, answer: str) -> float:
    """No signal on an even answer (every response scores 0); a random score on an odd one."""
    return 0.0 if int(answer) % 2 == 0 else random.random()


# A job per preset is ~20 s on 2 cores, mostly start-up. `make test` runs DAPO, whose promises
# only a job can keep: the driver's dynamic sampling and overlong filter, clip-higher in the loss.
# GRPO is the preset of nearly every other job test and of the demo. The others differ from
# those in what unit tests check: loss aggregation, normalisation and the sequence-level ratio
# (Dr. GRPO, GSPO: test_losses.py), the leave-one-out baseline (RLOO: test_advantages.py), the
# correction level and geometric MIS (REINFORCE++, GSPO: test_correction.py) and the adaptive KL
# controller (RLOO: test_kl.py, test_job_state.py); `make test-slow` runs every preset here.
IN_MAKE_TEST = {"dapo"}


@pytest.mark.parametrize("preset", [p if p in IN_MAKE_TEST else pytest.param(p, marks=pytest.mark.slow) for p in PRESETS])
def test_preset_runs_and_keeps_its_promises(ray_cluster, job_config, monkeypatch, preset):
    monkeypatch.syspath_prepend(str(REPO))  # preflight imports the reward function in this process
    assert Path.cwd() == REPO, "run from the repo root: the reward workers import this module from there"
    # A reference worker (a process that loads a model) where the test reads a KL to it: a preset's KL
    # term, or the last check below (the policy moved away from the reference), which runs unless the
    # overlong filter takes every sample out of the loss. Without one (DAPO) the learner's KL column is
    # to the weights that sampled: finite and >= 0 as asserted.
    kl_term = PRESETS[preset].get("kl", {}).get("coef", 0.0) > 0 or "kl" in EXTRA.get(preset, {})
    reference = kl_term or not PRESETS[preset].get("shaping", {}).get("overlong_filter", False)
    cfg = job_config(reference=True,  # (the preset's own KL settings, not the no-reference defaults)
        algorithm={"preset": preset, **EXTRA.get(preset, {})},
        generation={"replicas": 1, "prompts_per_request": 2,
                    "sampling": {"n": 4, "max_new_tokens": 8, "ignore_eos": True}},
        scoring={"reference": reference, "rewards": [{"type": "function", "function": REWARD}]},
        train={"total_steps": STEPS, "prompts_per_step": 4, "max_staleness": 1, "progress": False},
    )
    a = cfg.algorithm
    with Job(cfg) as job:
        result = job.run()
    rows = result.rows
    answers = {p.prompt_id: int(p.answer) for p in read_prompt_file(Path(result.run_dir) / "data" / "train.parquet")}

    # Versions advance one per step, and every step reports finite diagnostics.
    assert result.final_version == STEPS
    assert [r["weight_version"] for r in rows] == list(range(1, STEPS + 1))
    for row in rows:
        missing = [k for k in REQUIRED if k not in row]
        assert not missing, missing
        assert all(math.isfinite(row[k]) for k in REQUIRED), row
        assert row["kl"] >= 0 and 0 <= row["correction/ess"] <= 1 + 1e-6
        if row["samples_in_loss"]:
            assert row["correction/ess"] > 0
        fraction = "correction/frac_masked" if a.correction.mode == "mask" else "correction/frac_truncated"
        assert 0 <= row[fraction] <= 1

    # The KL coefficient is the preset's (or moves, with the adaptive controller), and the KL
    # term is in the loss exactly when the preset puts it there.
    if a.kl.controller == "fixed":
        assert all(row["kl_coef"] == a.kl.coef for row in rows), [row["kl_coef"] for row in rows]
    else:
        assert rows[-1]["kl_coef"] != rows[0]["kl_coef"], "adaptive KL coefficient never moved"
    for row in rows:
        assert ("policy/kl_loss_term" in row) == (a.kl.placement == "loss" and row["kl_coef"] > 0), row

    # Overlong filter: every response was truncated at max_new_tokens, so none enters the loss.
    for row in rows:
        assert row["samples_in_loss"] == (0 if a.shaping.overlong_filter else row["samples"]), row

    # Dynamic sampling: even-answer groups have no signal (same reward, same length), unless a KL
    # term in the reward sets their responses apart. Without it, they are trained on.
    trained_even = [c.prompt_id for c in result.consumed if answers[c.prompt_id] % 2 == 0]
    dropped = rows[-1]["dropped_zero_signal"]
    if not a.shaping.dynamic_sampling:
        assert dropped == 0 and trained_even
    elif not (a.kl.placement == "reward" and a.kl.coef > 0):
        assert not trained_even, f"groups without signal were trained on: {trained_even}"
        assert dropped > 0

    # The learner moved: after an earlier step trained on a group with signal, the last step's
    # policy differs from the reference.
    moved = any(answers[c.prompt_id] % 2 for c in result.consumed if c.step < STEPS - 1)
    if moved and all(r["samples_in_loss"] for r in rows):
        assert rows[-1]["kl"] > 0
