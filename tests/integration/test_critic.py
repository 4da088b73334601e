"""PPO with a learned critic on real Ray actors and real FSDP2 (gloo): the critic group learns a fixed
batch's returns and restores its checkpoint exactly, and a PPO job runs real steps through the driver."""

from __future__ import annotations

import json
import math
import random

import pytest
import ray

from actors.workers.critic import CriticRank
from actors.workers.rank_group import RankGroup
from actors.workers.settings import CriticRankSettings
from actors.job import Job
from rlhf_cluster.experience.records import ScoredSample, TrainBatch


def _samples(n: int = 8) -> list[ScoredSample]:
    rng = random.Random(1)
    out = []
    for i in range(n):
        length = 3 + i % 4
        out.append(ScoredSample(
            sample_id=f"s{i}", prompt_id=f"p{i}", group_id=f"g{i}",
            prompt_ids=[rng.randrange(2, 250) for _ in range(4)], response_ids=[rng.randrange(2, 250) for _ in range(length)],
            rollout_logprobs=[-5.0] * length, policy_version=0, finish_reason="stop", reward=float(i % 2),
            reward_components={}, ref_logprobs=[-5.0] * length, advantages=[0.0] * length,
        ))
    return out


def test_critic_value_loss_falls_on_a_fixed_batch_and_its_checkpoint_restores(ray_cluster, job_config, tiny_model_path, tmp_path):
    world = 2
    cfg = job_config(
        algorithm={"advantage": "gae"},
        critic={"world_size": world, "lr": 3e-3, "value_clip": 0.2, "epochs": 2},
        generation={"sampling": {"n": 1, "max_new_tokens": 8}},
    )
    samples = _samples()
    # Per-token targets that differ by sequence: a terminal reward of 0 or 1 with a small per-token
    # term, so fitting a single offset cannot halve the loss; the critic must tell sequences apart.
    returns = [[s.reward + 0.1 * t for t in range(len(s.response_ids))] for s in samples]
    settings = CriticRankSettings.of(cfg)
    group = RankGroup(CriticRank, lambda r: (settings, tiny_model_path, r, world), cfg.critic.resources, world,
                      section="critic")
    try:
        shares = [samples[r::world] for r in range(world)]
        losses, variances, clip_fracs = [], [], []
        for _ in range(12):
            # As in the job: the values of this step are the clip centre (old values) of its update.
            values = ray.get([rank.values.remote(TrainBatch.from_samples(s)) for rank, s in zip(group.ranks, shares)])
            batches = [
                TrainBatch.from_samples(s, returns=returns[r::world], old_values=v)
                for r, (s, v) in enumerate(zip(shares, values))
            ]
            stats = ray.get([rank.train.remote(b) for rank, b in zip(group.ranks, batches)])
            assert all(abs(st["critic/value_loss"] - stats[0]["critic/value_loss"]) < 1e-9 for st in stats), "ranks disagree"
            # The first epoch's loss is the error of the values before this step's updates.
            losses.append(stats[0]["critic/value_loss_before"])
            variances.append(stats[0]["critic/explained_variance"])
            clip_fracs.append(stats[0]["critic/value_clip_frac"])
        print(f"critic value loss per step: {[round(x, 4) for x in losses]}")
        print(f"explained variance per step: {[round(x, 3) for x in variances]}")
        print(f"value clip fraction per step: {[round(x, 3) for x in clip_fracs]}")
        assert all(math.isfinite(x) for x in losses + variances)
        assert losses[-1] < 0.5 * losses[0], losses
        assert variances[-1] > variances[0] + 0.3, variances
        # The second epoch starts from moved values: the clip acted on some tokens, never on all.
        assert 0 < max(clip_fracs) < 0.5, clip_fracs

        # FSDP2 sharded the value model across the critic's own two ranks.
        infos = ray.get([rank.shard_info.remote() for rank in group.ranks])
        assert any(local < full for local, full in infos[0].values())

        # A checkpoint restores exactly what was saved, after the state moved on.
        directory = tmp_path / "ckpt" / "critic"
        saved = ray.get([rank.save_checkpoint.remote(str(directory)) for rank in group.ranks])
        ray.get([rank.wait_checkpoint.remote() for rank in group.ranks])
        ray.get([rank.train.remote(b) for rank, b in zip(group.ranks, batches)])
        assert group.call("load_checkpoint", str(directory)) == saved
    finally:
        group.kill()


def _ppo_config(job_config, steps: int):
    return job_config(reference=True,
        generation={"replicas": 1, "prompts_per_request": 4, "sampling": {"n": 1, "max_new_tokens": 8}},
        algorithm={"advantage": "gae", "kl": {"placement": "reward", "estimator": "k1", "coef": 0.01}},
        critic={"world_size": 1, "lr": 1e-3},
        train={"total_steps": steps, "prompts_per_step": 8, "max_staleness": 1, "progress": False},
        checkpoint={"every_steps": 2},
    )


# The resume is a second job start (~20 s on 2 cores): `make test` runs the PPO job and checks what
# its checkpoint holds (the critic's files and rank digests; the critic ranks' own save and exact
# restore: the test above); `make test-slow` also resumes it, the driver restoring the critic.
@pytest.mark.parametrize("resume", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["run", "run-and-resume"])
def test_ppo_job_with_a_critic_runs_real_steps_and_resumes(ray_cluster, job_config, resume):
    steps = 3
    cfg = _ppo_config(job_config, steps)
    job = Job(cfg)
    try:
        result = job.run()
        assert [r["weight_version"] for r in result.rows] == list(range(1, steps + 1))
        rows = [json.loads(x) for x in (job.run_dir / "metrics.jsonl").read_text().splitlines()]
        for row in rows:
            for key in ("critic/value_loss", "critic/explained_variance", "critic/value_clip_frac", "advantage/return_mean"):
                assert math.isfinite(row[key]), (key, row)
            # The critic stepped on every batch (a real, finite gradient, not skipped).
            assert row["critic/grad_norm"] > 0 and row["critic/skipped_updates"] == 0
        # The critic is in the job checkpoint, and the manifest carries its rank digests.
        manifest = json.loads(next(job.checkpoint_dir.glob("step-*/manifest.json")).read_text())
        assert len(manifest["critic_rank_digests"]) == 1
        assert any(name.startswith("critic/learner/") for name in manifest["files"])
        # Prometheus: the driver exports the critic gauges, and the critic rank is a scrape target.
        targets = json.loads((job.run_dir / "prometheus_targets.json").read_text())
        assert "critic" in {t["labels"]["pool"] for t in targets}
        from prometheus_client import REGISTRY

        loss = REGISTRY.get_sample_value("rlhf_critic_value_loss", {"job": "test", "pool": "driver", "worker": "driver"})
        assert loss == rows[-1]["critic/value_loss"]
    finally:
        job.shutdown()
    if not resume:
        return
    # Resume one more step from the newest checkpoint: the critic's restored state must match the
    # digests its ranks took at save (the driver refuses the checkpoint otherwise).
    job = Job(_ppo_config(job_config, steps + 1), resume="auto")
    try:
        resumed = json.loads((job.run_dir / "resume.json").read_text())
        assert resumed["step"] == steps - 1
        result = job.run()
        assert [r["step"] for r in result.rows] == [steps]
        lines = [json.loads(x) for x in (job.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines] == list(range(steps + 1))
        assert math.isfinite(result.rows[-1]["critic/value_loss"])
    finally:
        job.shutdown()
