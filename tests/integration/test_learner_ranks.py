"""FSDP2 at world size 2 computes the same step as one rank holding the whole batch.

The loss denominator is the global valid-token count and FSDP2 averages gradients over ranks;
if either were wrong the 2-rank loss or gradient norm would differ (by the token split or by 2x).
"""

from __future__ import annotations

import random

import pytest
import ray
import torch

from actors.workers.learner import LearnerRank
from actors.workers.rank_group import RankGroup
from actors.workers.settings import LearnerRankSettings
from rlhf_cluster.config import ResourcesConfig
from rlhf_cluster.experience.records import ScoredSample, TrainBatch
from tests.job_configs import small_job_config


def _samples(n: int = 6) -> list[ScoredSample]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        # Unequal lengths, so the two ranks hold different token counts.
        length = 3 + 2 * i
        out.append(
            ScoredSample(
                sample_id=f"s{i}", prompt_id=f"p{i}", group_id=f"g{i // 3}",
                prompt_ids=[rng.randrange(2, 250) for _ in range(5)],
                response_ids=[rng.randrange(2, 250) for _ in range(length)],
                rollout_logprobs=[-5.5 + rng.uniform(-0.3, 0.3) for _ in range(length)],
                policy_version=0, finish_reason="length", reward=0.0, reward_components={},
                ref_logprobs=[-5.5 + rng.uniform(-0.3, 0.3) for _ in range(length)],
                advantages=[rng.uniform(-1, 1)] * length,
            )
        )
    return out


def _group(cfg, model_path, world) -> RankGroup:
    settings = LearnerRankSettings.of(cfg)
    return RankGroup(LearnerRank, lambda r: (settings, model_path, r, world), ResourcesConfig(), world)


SAMPLES = _samples(6)
# One rank holds the whole batch; two hold 5+7 and 9+11+13+15 tokens.
SHARDS = {1: [SAMPLES], 2: [SAMPLES[:2], SAMPLES[2:]]}
SEQ_LEN = max(len(s.prompt_ids) + len(s.response_ids) for s in SAMPLES)


@pytest.fixture(scope="module")
def one_step(ray_cluster, model_cache, tiny_model_path, tmp_path_factory):
    """`one_step(world, **learner)`: rank 0's metrics and the gathered weights after one step on
    SHARDS[world] from the tiny model, with the KL term in the loss. Each setting runs once per
    module (a rank group is seconds of start-up; the tests compare settings, some the same ones),
    and every rank must report the same loss. The one-rank group of the plain settings stays up
    for the module (`one_step.kept`): the non-finite test trains it on."""
    done: dict = {}
    kept: dict = {}

    def step(world: int, **learner) -> tuple[dict, dict]:
        key = (world, tuple(sorted(learner.items())))
        if key not in done:
            cfg = small_job_config(tmp_path_factory.mktemp("learner"), model_cache, reference=True,
                                   learner={"world_size": world, "lr": 1e-3, "max_grad_norm": 1e9, **learner},
                                   algorithm={"kl": {"placement": "loss", "coef": 0.1},
                                              "loss": {"aggregation": "token_mean"}})
            ranks = _group(cfg, tiny_model_path, world)
            try:
                stats = [m for m, _ in ray.get([rank.train.remote(TrainBatch.from_samples(s), 1, 0.1)
                                                for rank, s in zip(ranks, SHARDS[world])])]
                weights = ray.get([rank.full_state_dict.remote() for rank in ranks])[0]
            except BaseException:
                ranks.kill()
                raise
            if key == (1, ()):
                kept[key] = ranks
            else:
                ranks.kill()
            assert all(abs(m["policy/loss"] - stats[0]["policy/loss"]) < 1e-9 for m in stats), "ranks disagree"
            done[key] = stats[0], weights
        return done[key]

    step.kept = kept  # type: ignore[attr-defined]
    yield step
    for ranks in kept.values():
        ranks.kill()


def test_two_ranks_match_one_rank(one_step):
    (one, _), (two, _) = one_step(1), one_step(2)
    assert abs(one["policy/loss"] - two["policy/loss"]) <= 1e-5 * max(1.0, abs(one["policy/loss"]))
    assert abs(one["learner/grad_norm"] - two["learner/grad_norm"]) <= 1e-4 * one["learner/grad_norm"]
    assert abs(one["correction/ess"] - two["correction/ess"]) < 1e-6
    assert one["learner/grad_norm"] > 0


def test_non_finite_loss_skips_the_update(one_step):
    """On the one-rank group of `one_step` (after its step: a rank group is seconds of start-up)."""
    one_step(1)
    (rank,) = one_step.kept[(1, ())]
    samples = _samples(3)
    samples[0].advantages = [float("nan")] * len(samples[0].advantages)
    before = ray.get(rank.full_state_dict.remote())
    stats, _ = ray.get(rank.train.remote(TrainBatch.from_samples(samples), 2, 0.0))
    after = ray.get(rank.full_state_dict.remote())
    assert stats["learner/skipped_updates"] == 1
    assert all(torch.equal(before[k], after[k]) for k in before), "a NaN step must not change the weights"
    # The next, finite step updates normally.
    stats, _ = ray.get(rank.train.remote(TrainBatch.from_samples(_samples(3)), 3, 0.0))
    assert stats["learner/skipped_updates"] == 0
    assert any(not torch.equal(after[k], v) for k, v in ray.get(rank.full_state_dict.remote()).items())


def test_micro_batches_accumulate_to_the_full_batch_update(one_step):
    """Micro-batches of two padded rows (gradient accumulation: 3 on one rank) give the step of
    the whole batch at once: same loss, same pre-clip gradient norm (a per-micro-batch denominator
    would scale it), same weights. With 2 ranks of unequal lengths, the ranks need different
    micro-batch counts (1 and 2) and one pads."""
    full, full_weights = one_step(1)
    for world in (1, 2):
        got, weights = one_step(world, max_tokens_per_micro_batch=2 * SEQ_LEN)
        assert abs(got["policy/loss"] - full["policy/loss"]) <= 1e-5 * max(1.0, abs(full["policy/loss"])), world
        assert abs(got["learner/grad_norm"] - full["learner/grad_norm"]) <= 1e-4 * full["learner/grad_norm"], world
        assert abs(got["learner/tokens"] - full["learner/tokens"]) < 1e-9, world
        diff = max(float((weights[k] - full_weights[k]).abs().max()) for k in full_weights)
        assert diff < 1e-5, (world, diff)
    assert full["learner/grad_norm"] > 0


def test_gradient_checkpointing_and_bf16_mixed_precision(one_step):
    """Checkpointing recomputes the same activations: the step is unchanged. bf16 compute (FSDP2
    mixed precision over 2 ranks, fp32 master weights and gradient reduction) changes the step only
    by bf16 rounding, and the weights stay fp32."""
    fp32, _ = one_step(2)
    ckpt, _ = one_step(2, gradient_checkpointing=True)
    bf16, bf16_weights = one_step(2, gradient_checkpointing=True, mixed_precision="bf16")
    assert abs(ckpt["policy/loss"] - fp32["policy/loss"]) <= 1e-6 * max(1.0, abs(fp32["policy/loss"]))
    assert abs(ckpt["learner/grad_norm"] - fp32["learner/grad_norm"]) <= 1e-5 * fp32["learner/grad_norm"]
    # bf16 has 8 mantissa bits: the gradient norm agrees to a few percent, not to fp32 precision.
    rel = abs(bf16["learner/grad_norm"] - fp32["learner/grad_norm"]) / fp32["learner/grad_norm"]
    assert 0 < rel < 0.05, rel
    assert all(t.dtype == torch.float32 for t in bf16_weights.values() if t.is_floating_point())
