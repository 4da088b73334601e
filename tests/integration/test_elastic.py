"""Elastic learner: a learner node is removed from a running cluster (its raylet and every process
on it end, as when a machine is lost), and with `faults.elastic` the job rolls back to its
newest checkpoint, resharded onto the one learner rank it can still place, and finishes every
step once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STEPS = 8


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_a_lost_learner_node_shrinks_the_learner_and_the_job_finishes(job_config, tmp_path):
    cfg = job_config(
        name="elastic",
        # Pools on the head node, one learner rank per learner node: each label exists only there.
        generation={"replicas": 1, "prompts_per_request": 1, "sampling": {"n": 4, "max_new_tokens": 8},
                    "resources": {"custom": {"rlhf_pools": 1}}},
        scoring={"resources": {"custom": {"rlhf_pools": 1}}},
        learner={"world_size": 2, "lr": 1e-3, "resources": {"custom": {"rlhf_learner": 1}}},
        train={"total_steps": STEPS, "prompts_per_step": 2, "max_staleness": 1, "progress": False},
        checkpoint={"every_steps": 2, "keep": 2},
        # The rebuilt learner waits elastic_wait_s for a rank that cannot be placed (its node is gone)
        # before it goes on with one: the whole wait is the test's. Placing both ranks at the start
        # is a placement group on two live nodes: no process starts within the wait.
        faults={"elastic": True, "elastic_wait_s": 3, "heartbeat_interval_s": 1.0, "heartbeat_timeout_s": 5.0},
    )
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    run_dir = Path(cfg.run_dir)
    # Its own process: the cluster of three raylets is not the one this test session uses.
    proc = subprocess.run([sys.executable, str(HERE / "lose_a_learner_node.py"), str(config)], cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:]
    assert "removing a learner node after step" in out
    assert "continuing on 1 (faults.elastic)" in out, out[-4000:]
    assert "resharded from 2 to 1 ranks" in out, out[-4000:]
    # Every step once, in order, after the rollback replaced the steps past the checkpoint.
    assert [r["step"] for r in _rows(run_dir)] == list(range(STEPS))
    consumed = [json.loads(x) for x in (run_dir / "consumed.jsonl").read_text().splitlines()]
    assert len({c["sample_id"] for c in consumed}) == len(consumed) == STEPS * 2 * 4, "a sample trained twice or lost"
    groups = {}
    for c in consumed:
        groups.setdefault(c["sample_id"].rsplit(":", 1)[0], c["prompt_id"])
    assert len(set(groups.values())) == len(groups), "a prompt was trained on twice"
