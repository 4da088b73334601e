"""The soak's job: the demo's, with more pools than the demo and a tenth of its learning rate, its
generation workers on the raylet the soak kills and restarts, its reward function the soak's own
(`benchmarks.soak.reward`), written as a config file for `rlhf-cluster train`."""

from __future__ import annotations

from pathlib import Path

import yaml

from benchmarks.common import REPO

SOAK_LR = 3.0e-5


def job_config(workdir: Path, run_dir: Path) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg.update(name="soak", run_dir=str(run_dir))
    cfg["generation"].update(replicas=2, resources={"custom": {"soak_gen": 1}})
    cfg["scoring"] = {
        "reward_replicas": 2,
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
    path = workdir / "soak.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
