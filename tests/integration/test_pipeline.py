"""The real pipeline end to end: Ray actors, vLLM generation, reference scoring, FSDP2, weight store."""

from __future__ import annotations

import json
import urllib.request
from collections import Counter

import pytest
import ray
import torch

from actors.job import Job
from tests.tracker_files import tensorboard_scalars, wandb_history, wandb_records, wandb_runs
from rlhf_cluster.weights import WeightStore


# Synchronous RL (staleness 0) is the same code path with a tighter admission bound: `make test`
# runs it in test_replay's recorded run (max_staleness 0, every sample at lag 0, or its replay would
# not match the run's checkpoint); `make test-slow` runs it here too.
@pytest.mark.parametrize("max_staleness", [pytest.param(0, marks=pytest.mark.slow), 2])
def test_versions_advance_and_staleness_bound_holds(ray_cluster, job_config, max_staleness):
    steps = 5
    cfg = job_config(reference=True,
        data={"num_prompts": 256, "eval_prompts": 16},
        generation={"replicas": 2, "prompts_per_request": 1, "sampling": {"n": 4, "max_new_tokens": 8}},
        learner={"world_size": 2, "lr": 1e-3},
        train={"total_steps": steps, "prompts_per_step": 4, "max_staleness": max_staleness, "progress": False},
        weights={"transport": "filesystem"},  # every version through the store directory (direct: most tests)
        metrics={"tensorboard": True, "wandb": {"project": "rlhf-tests", "mode": "offline"}},  # no network
    )
    job = Job(cfg)
    try:
        result = job.run()

        # Held-out accuracy was measured before and after, on the held-out prompts.
        evaluation = json.loads((job.run_dir / "eval.json").read_text())
        assert evaluation["prompts"] == 16 and evaluation["version_after"] == steps
        assert 0.0 <= result.accuracy_before <= 1.0 and 0.0 <= result.accuracy_after <= 1.0
        # ...and as the mean over data.eval_samples sampled answers per prompt.
        assert evaluation["samples_per_prompt"] == cfg.data.eval_samples == 8
        assert 0.0 <= evaluation["sampled_accuracy_before"] <= 1.0 and 0.0 <= evaluation["sampled_accuracy_after"] <= 1.0

        # Versions advance one per step; each went through the store, whose newest is the last step's.
        assert [r["weight_version"] for r in result.rows] == list(range(1, steps + 1))
        assert result.final_version == steps
        assert WeightStore(cfg.weights_dir).latest_version() == steps
        loaded = [r for r in job.delivery_receipts if r.loaded]
        assert {r.version for r in loaded} == set(range(steps + 1))
        assert all(r.proven for r in loaded)  # the store's shard checksums

        # Every consumed sample obeys the bound, at the step that consumed it.
        assert len(result.consumed) == steps * cfg.samples_per_step
        assert len({c.sample_id for c in result.consumed}) == len(result.consumed), "a sample was used twice"
        lags = [c.step - c.policy_version for c in result.consumed]
        assert all(0 <= lag <= max_staleness for lag in lags), Counter(lags)
        if max_staleness == 0:
            assert set(lags) == {0}

        # Both generation workers produced samples the learner used.
        by_worker = Counter(c.worker for c in result.consumed)
        assert set(by_worker) == {"gen0", "gen1"}, by_worker

        # Per-step rows carry what the job prints, and the JSONL file holds the same rows.
        lines = [json.loads(x) for x in (job.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines] == list(range(steps))
        for row in lines:
            for key in ("reward_mean", "kl", "staleness_mean", "weight_version", "step_seconds"):
                assert key in row
            assert row["staleness_max"] <= max_staleness

        # Every actor's /metrics endpoint answers a real scrape with its component's metrics.
        targets = json.loads((job.run_dir / "prometheus_targets.json").read_text())
        pools = Counter(t["labels"]["pool"] for t in targets)
        assert pools == {"learner": 2, "generation": 2, "reward": 1, "reference": 1, "driver": 1}, pools
        expected = {
            "generation": 'rlhf_generation_tokens_total{job="test",pool="generation"',
            "learner": "rlhf_learner_step_seconds_count",
            "reward": "rlhf_scoring_samples_total",
            "reference": "rlhf_scoring_samples_total",
            "driver": "rlhf_staleness_steps_bucket",
        }
        for target in targets:
            body = urllib.request.urlopen(f"http://{target['targets'][0]}/metrics", timeout=10).read().decode()
            assert expected[target["labels"]["pool"]] in body, target

        # FSDP2: both ranks hold a strict part of every sharded parameter, together all of it.
        infos = ray.get([rank.shard_info.remote() for rank in job.learner_ranks])
        for name, (local0, full) in infos[0].items():
            local1, _ = infos[1][name]
            assert local0 + local1 >= full and local0 < full and local1 < full, (name, local0, local1, full)

        # Samples produced but not trained on were persisted in the buffer's Arrow format.
        assert (job.run_dir / "buffer.arrow").is_file()

        # The published weights equal the gathered full state dict of the trained model.
        gathered = ray.get([rank.full_state_dict.remote() for rank in job.learner_ranks])[0]
        published = WeightStore(cfg.weights_dir).load(steps)
        assert set(gathered) == set(published)
        for key, tensor in gathered.items():
            assert torch.equal(tensor, published[key]), key
        # ...and training moved them away from the initial weights.
        assert any(not torch.equal(gathered[k], v) for k, v in _initial_weights(cfg).items())
    finally:
        job.shutdown()

    # The same rows reached TensorBoard and W&B against the learner step, and the final evaluation at
    # the last step (the trackers' runs end with the job).
    charted = tensorboard_scalars(job.run_dir)
    assert [s for s, _ in charted["reward_mean"]] == list(range(steps))
    assert [v for _, v in charted["reward_mean"]] == pytest.approx([x["reward_mean"] for x in lines], rel=1e-6)
    assert charted["eval_accuracy"] == [(steps - 1, pytest.approx(result.accuracy_after))]
    (wandb_run,) = wandb_runs(job.run_dir)
    history = wandb_history(wandb_records(wandb_run))
    assert [h["reward_mean"] for h in history[:steps]] == pytest.approx([x["reward_mean"] for x in lines])
    assert history[steps] == {**result.evaluation_after, "step": steps - 1}


# `slow` (issue 68's time): the pool's error with the death as its cause is unit-tested
# (tests/unit/test_pool_spares.py, restarts used up), and a pool's error ending a job, naming its
# cause, is tests/integration/test_judge_reward.py's mute judge.
@pytest.mark.slow
def test_a_dead_worker_without_restarts_left_ends_the_job_with_its_cause(ray_cluster, job_config):
    # A failure the pool cannot absorb must fail the job loudly with the cause, not hang it.
    cfg = job_config(
        train={"total_steps": 3, "prompts_per_step": 2, "max_staleness": 1, "progress": False},
        faults={"max_worker_restarts": 0},
    )
    job = Job(cfg)
    ray.kill(next(iter(job.workers("reward").values())), no_restart=True)
    try:
        with pytest.raises(RuntimeError, match="reward pool: worker reward0 died") as info:
            job.run()
        assert isinstance(info.value.__cause__, ray.exceptions.RayActorError)
    finally:
        job.shutdown()
    assert job.rows == []


def _initial_weights(cfg):
    from safetensors.torch import load_file

    from rlhf_cluster.models.tiny_model import tiny_model_dir

    return load_file(str(tiny_model_dir(cfg.model.tiny, cfg.model.cache_dir) / "model.safetensors"))
