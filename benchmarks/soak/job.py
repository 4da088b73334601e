"""The soak's job: the demo's, with more pools than the demo and a tenth of its learning rate, its
generation workers on the raylet the soak kills and restarts, its reward function the soak's own
(`benchmarks.soak.reward`), the autoscaler on for its generation and reward pools and a warm
generation spare (issue 73), written as a config file for `rlhf-cluster train`."""

from __future__ import annotations

from pathlib import Path

import yaml

from benchmarks.common import REPO

SOAK_LR = 3.0e-5
GENERATION_REPLICAS = 2  # at the start and after every resume (a resumed job starts at its configured sizes)
REWARD_REPLICAS = 2
# The autoscaler's settings for the soak's pools. The job trains ~200 steps a minute outside faults on a
# 2-core machine (~40 within a schedule of back-to-back faults): a window of 5 steps is a few seconds of
# rows, and a shrink waits 20 idle steps in a row. Generation stays within 2..3: two engines on the raylet
# the soak kills, so losing one still leaves one sampling, and a third where the cluster has room
# (`gen_slots`); it grows when a fault left the learner waiting. Reward within 1..3, shrinking below a
# busy share of 0.4: two verifier workers are busy ~0.3 of a step, so one keeps up with this job and a
# hanging reward function grows it back. The cooldown, not the step rate, bounds how often a pool changes:
# 90 s (270 s for a reversal) holds a pool between bounds two apart to at most 4 changes in any 10 minutes
# (pools.OSCILLATION_*, checked).
AUTOSCALE: dict[str, dict] = {
    "generation": {"enabled": True, "min_replicas": 2, "max_replicas": 3},
    "reward": {"enabled": True, "min_replicas": 1, "max_replicas": 3, "busy_low": 0.4},
}
AUTOSCALE_COMMON = {"window": 5, "shrink_after_steps": 20, "cooldown_s": 90.0}


def gen_slots(spares: int) -> int:
    """The `soak_gen` resource of the generation raylet: room for generation at its largest, its spares,
    and one more (a spare started behind a promoted one before the lost worker's slot is freed)."""
    return AUTOSCALE["generation"]["max_replicas"] + spares + 1


def job_config(workdir: Path, run_dir: Path, autoscale: bool = True, spares: int = 1) -> Path:
    """The job's config file in `workdir` (`autoscale`: `scaling.auto` for generation and reward;
    `spares`: `generation.spares`)."""
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg.update(name="soak", run_dir=str(run_dir))
    cfg["generation"].update(replicas=GENERATION_REPLICAS, spares=spares, resources={"custom": {"soak_gen": 1}})
    cfg["scoring"] = {
        "reward_replicas": REWARD_REPLICAS,
        "reference_replicas": 1,
        "rewards": [
            {
                "type": "function",
                "function": "benchmarks.soak.reward:arithmetic",
                "on_error": "drop",
                "timeout_s": 2.0,
                "max_failure_fraction": 1.0,
            }
        ],
    }
    cfg["weights"] = {"transport": {"type": "collective"}}
    cfg["train"].update(total_steps=1_000_000, progress=False)
    # A tenth of the demo's learning rate: at the demo's, this job has learned all it will by step ~3,000
    # of the hour's ~14,000 (entropy ~0.01, one distinct answer in most groups, no gradient in ~80% of
    # steps), and from there its held-out accuracy drifts under rare single-group Adam updates, with or
    # without faults (benchmarks/README.md, "soak"): no yardstick for what faults do to learning.
    cfg["learner"]["lr"] = SOAK_LR
    cfg["data"]["eval_every_steps"] = 1000  # ~1 s each: the held-out accuracy over the hour, in the report
    cfg["checkpoint"] = {"every_steps": 20, "keep": 2}
    cfg["metrics"] = {"trace": False, "samples_top": 1, "samples_random": 0}
    cfg["faults"] = {
        "max_worker_restarts": 100_000,
        "max_learner_restarts": 100_000,
        "restart_backoff_s": 0.1,
        "heartbeat_interval_s": 1.0,
        "heartbeat_timeout_s": 5.0,
    }
    if autoscale:
        cfg["scaling"] = {"auto": {pool: {**bounds, **AUTOSCALE_COMMON} for pool, bounds in AUTOSCALE.items()}}
    path = workdir / "soak.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
