"""The critic warm-up (`critic.freeze_policy_steps`, veRL's `trainer.critic_warmup`) on real rank
actors (FSDP2 on gloo, the tiny model): through the job's `Trainer`, the first two steps train the
critic alone and publish the policy's weights unchanged as versions 1 and 2; step 3 trains the
policy. A checkpoint taken during the warm-up, restored, continues the count by the job's step
and ends in the same state; the restored run's first step, inside the warm-up, logs it again.
(That such a checkpoint leaves the policy's optimizer untouched: tests/unit/test_critic_warmup_checkpoint.py.)"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import torch

from actors.trainer import Trainer
from rlhf_cluster.experience.records import ScoredSample
from rlhf_cluster.weights import WeightStore
from tests.integration.test_critic import _samples as critic_samples

HELD = 2


def _samples(n: int = 4) -> list[ScoredSample]:
    """test_critic's samples, their rollout log-probs sloped (a held step's KL is not 0)."""
    samples = critic_samples(n)
    return [replace(s, rollout_logprobs=[-5.0 + 0.1 * t for t in range(len(s.response_ids))]) for s in samples]


async def _digests(trainer: Trainer) -> tuple[list[str], list[str]]:
    policy = await asyncio.gather(*trainer.policy.submit("state_digest"))
    critic = await asyncio.gather(*trainer.critic.submit("state_digest"))
    return policy, critic


async def _step(trainer: Trainer, step: int, samples: list[ScoredSample]) -> tuple[dict, list[str], list[str]]:
    stats, published = await trainer.train(step, samples, 0.0)
    await published
    return (stats, *await _digests(trainer))


def test_critic_warm_up_holds_the_policy_then_trains_it(ray_cluster, job_config, tiny_model_path, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="actors.trainer")
    cfg = job_config(
        algorithm={"advantage": "gae"},
        critic={"world_size": 1, "lr": 1e-3, "freeze_policy_steps": HELD},
        learner={"world_size": 1, "lr": 1e-3, "lr_warmup_steps": 4},
        generation={"sampling": {"n": 1, "max_new_tokens": 8}},
        weights={"transport": "filesystem", "keep": 10},  # every version in the store, to read back
        train={"total_steps": 4},
    )
    samples = _samples()
    ckpt = tmp_path / "ckpt"
    for folder in ("learner", "rng", "critic/rng"):
        (ckpt / folder).mkdir(parents=True)
    trainer = Trainer(cfg, tiny_model_path, None)
    store = WeightStore(cfg.weights_dir, keep=10)

    async def run() -> tuple[list, list, list, list]:
        policy0, critic0 = await _digests(trainer)
        steps = [await _step(trainer, 0, samples)]
        await trainer.stage_checkpoint(ckpt)  # taken during the warm-up, after step 0 (version 1)
        await trainer.wait_checkpoint()
        steps += [await _step(trainer, step, samples) for step in (1, 2)]
        await trainer.wait_persisted()
        weights = [store.load(v) for v in range(4)]
        # Resume from step 0's checkpoint as the driver restores one: the later versions discarded,
        # the checkpoint's republished; step 1 is still held (the job's step counts), step 2 trains.
        trainer.load_checkpoint(ckpt)
        store.discard_from(1)
        trainer.publish_now(1)
        again = [await _step(trainer, step, samples) for step in (1, 2)]
        await trainer.wait_persisted()
        return [policy0, critic0], steps, weights, again

    try:
        trainer.publish_now(0)
        (policy0, critic0), steps, weights, again = asyncio.run(run())
        resumed = store.load(3)
    finally:
        trainer.kill()
    for v in (1, 2):  # the warm-up's versions hold the initial weights
        assert weights[v].keys() == weights[0].keys()
        assert all(torch.equal(weights[v][k], weights[0][k]) for k in weights[0]), f"version {v} changed the policy"
    assert any(not torch.equal(weights[3][k], weights[0][k]) for k in weights[0]), "step 2 did not train the policy"

    (s0, p0, c0), (s1, p1, c1), (s2, p2, c2) = steps
    # The policy ranks ran nothing: model, optimizer, LR schedule and step count as they started ...
    assert p0 == p1 == policy0 and p2 != policy0
    # ... while the critic trained on every step's batch.
    assert len({critic0[0], c0[0], c1[0], c2[0]}) == 4
    for stats in (s0, s1, s2):
        assert stats["critic/grad_norm"] > 0 and stats["critic/skipped_updates"] == 0
    assert [s["policy/updated"] for s in (s0, s1, s2)] == [0.0, 0.0, 1.0]
    # A held step reports the rollouts' KL (a step row needs it) and no policy update's metrics.
    assert s0["policy/kl"] > 0 and s0["learner/step_seconds"] == 0.0
    assert "policy/loss" not in s0 and "learner/grad_norm" not in s0
    assert s2["learner/grad_norm"] > 0 and s2["learner/skipped_updates"] == 0
    # The policy's LR warm-up (4 steps) starts at its first update: the LR reported after it is the
    # second warm-up step's, 2/4 of the peak (counting the held steps would give 4/4).
    assert abs(s2["learner/lr"] - 0.5 * cfg.learner.lr) < 1e-12

    # The restored warm-up checkpoint: step 1 held again, step 2 the same first policy update.
    (r1, rp1, _), (r2, rp2, rc2) = again
    assert r1["policy/updated"] == 0.0 and rp1 == policy0
    assert r2["policy/updated"] == 1.0 and rp2 == p2 and rc2 == c2
    assert all(torch.equal(resumed[k], weights[3][k]) for k in weights[3])
    # The warm-up's lines: its start, its end, and after the restore the resumed run's first step.
    lines = [r.getMessage() for r in caplog.records if r.name == "actors.trainer" and "warm-up" in r.getMessage()]
    assert lines == [
        "critic warm-up: steps 0..1 train the critic alone, 2 in all (critic.freeze_policy_steps)",
        "step 2: critic warm-up done (2 steps); the policy trains from this step on",
        "critic warm-up: steps 1..1 train the critic alone (from step 1), 2 in all (critic.freeze_policy_steps)",
        "step 2: critic warm-up done (2 steps); the policy trains from this step on",
    ]
