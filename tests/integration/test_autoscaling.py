"""A job whose reward function is slow grows its reward pool by itself (`scaling.auto.reward`),
within its bounds, each decision on record (events.jsonl, Prometheus, `rlhf-cluster status`)."""

from __future__ import annotations

import time
from pathlib import Path

from prometheus_client import REGISTRY

from actors.job import Job
from rlhf_cluster.fileio import read_jsonl
from rlhf_cluster.run.status import describe_run


def slow_reward(response: str, answer: str) -> float:
    """0.2 s a sample: the reward pool, not generation, holds the learner up."""
    time.sleep(0.2)
    return 1.0 if response.strip() == answer else min(len(set(response)), 10) / 10


def test_a_slow_reward_pool_grows_by_itself_within_its_bounds(ray_cluster, job_config):
    cfg = job_config(
        name="autoscaling",
        generation={"replicas": 1, "prompts_per_request": 1, "sampling": {"n": 4, "max_new_tokens": 8}},
        scoring={
            "reward_replicas": 1,
            "rewards": [{"type": "function", "function": "tests.integration.test_autoscaling:slow_reward"}],
        },
        train={"total_steps": 10, "prompts_per_step": 2, "max_staleness": 1, "progress": False},
        scaling={"auto": {"reward": {"enabled": True, "min_replicas": 1, "max_replicas": 3, "window": 2,
                                     "grow_wait_s": 0.2, "busy_high": 0.5, "busy_low": 0.05,
                                     "shrink_after_steps": 100, "cooldown_s": 0}}},
    )  # fmt: skip
    with Job(cfg) as job:
        job.run()
        sizes = job.pool_sizes()
    events = read_jsonl(Path(cfg.run_dir) / "events.jsonl").rows
    auto = [e for e in events if e["event"] == "autoscaled"]
    scaled = [e for e in events if e["event"] == "scaled"]
    print("reward pool:", [(e["from"], e["to"], e["reason"]) for e in auto])
    assert sizes["reward"] > 1 and sizes["generation"] == 1, (sizes, events)
    assert auto and {e["pool"] for e in auto} == {"reward"}, events
    assert all(e["to"] == e["from"] + 1 and "learner waited" in e["reason"] for e in auto), auto
    # Never past its bound, and no more changes than the bounds leave room for (1 -> 3: two).
    assert all(e["replicas"] <= 3 and e["source"] == "auto" for e in scaled) and len(auto) <= 2, scaled
    assert sizes["reward"] == auto[-1]["to"]
    labels = {"job": "autoscaling", "pool": "reward", "worker": "driver"}
    assert REGISTRY.get_sample_value("rlhf_autoscaler_decisions_total", {**labels, "direction": "up"}) == len(auto)
    assert REGISTRY.get_sample_value("rlhf_pool_target_replicas", labels) == sizes["reward"]
    status = "\n".join(describe_run(Path(cfg.run_dir)))
    last = auto[-1]
    assert f"  reward: {sizes['reward']} workers, auto; last decision {last['from']} -> {last['to']}" in status, status
