"""Every algorithm preset runs real pipeline steps and reports the diagnostics users watch."""

from __future__ import annotations

import asyncio
import math

import pytest

from actors.driver import Driver

PRESETS = {
    "grpo": {},
    "dr_grpo": {},
    "dapo": {},
    # GSPO with geometric-mean MIS exercises the mask mode and its lower bound.
    "gspo": {"correction": {"level": "geometric", "mode": "mask", "cap": 2.0, "lower": 0.5}},
    "rloo": {"kl": {"controller": "adaptive", "target": 1.0, "horizon": 100}},
    "reinforce_pp": {"correction": {"level": "sequence", "mode": "truncate", "cap": 2.0}},
}

REQUIRED = ["kl", "policy/clip_frac_low", "policy/clip_frac_high", "policy/approx_kl", "policy/entropy",
            "correction/ess", "correction/mismatch_k1", "correction/mismatch_k3", "reward_mean", "kl_coef"]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_runs_and_reports_diagnostics(ray_cluster, job_config, preset):
    algorithm = {"preset": preset, **PRESETS[preset]}
    cfg = job_config(algorithm=algorithm, train={"total_steps": 3, "prompts_per_step": 4, "max_staleness": 1, "progress": False})
    driver = Driver(cfg)
    try:
        result = asyncio.run(driver.run())
    finally:
        driver.shutdown()
    assert result.final_version == 3
    for row in result.rows:
        missing = [k for k in REQUIRED if k not in row]
        assert not missing, missing
        assert all(math.isfinite(row[k]) for k in REQUIRED), row
        assert row["kl"] >= 0 and 0 <= row["correction/ess"] <= 1 + 1e-6
        if row["samples_in_loss"]:
            assert row["correction/ess"] > 0
        fraction = "correction/frac_masked" if cfg.algorithm.correction.mode == "mask" else "correction/frac_truncated"
        assert 0 <= row[fraction] <= 1
    # Staleness 1 means steps after the first train on samples from the previous version,
    # so the learner has moved and the KL to the reference is positive.
    assert result.rows[-1]["kl"] > 0 or preset == "dapo"
    if preset == "rloo":
        assert result.rows[-1]["kl_coef"] != result.rows[0]["kl_coef"], "adaptive KL coefficient never moved"
    if preset == "dapo":
        assert all(row["samples_in_loss"] <= row["samples"] for row in result.rows)
