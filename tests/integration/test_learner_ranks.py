"""FSDP2 at world size 2 computes the same step as one rank holding the whole batch.

The loss denominator is the global valid-token count and FSDP2 averages gradients over ranks;
if either were wrong the 2-rank loss or gradient norm would differ (by the token split or by 2x).
"""

from __future__ import annotations

import random

import ray
import torch

from actors.workers.learner import LearnerRank
from actors.workers.rank_group import RankGroup
from rlhf_cluster.config import ResourcesConfig
from rlhf_cluster.experience.records import ScoredSample, TrainBatch


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
    return RankGroup(LearnerRank, lambda r: (cfg.model_dump(), model_path, r, world), ResourcesConfig(), world)


def test_two_ranks_match_one_rank(ray_cluster, job_config, tiny_model_path, tmp_path):
    samples = _samples()
    first, second = samples[:2], samples[2:]  # 5+7 tokens vs 9+11+13+15 tokens
    results = {}
    for world, shards in ((1, [samples]), (2, [first, second])):
        cfg = job_config(reference=True,
            run_dir=str(tmp_path / f"world{world}"),
            learner={"world_size": world, "lr": 1e-3, "max_grad_norm": 1e9},
            algorithm={"kl": {"placement": "loss", "coef": 0.1}, "loss": {"aggregation": "token_mean"}},
        )
        ranks = _group(cfg, tiny_model_path, world)
        stats = [m for m, _ in ray.get([rank.train.remote(TrainBatch.from_samples(s), 1, 0.1) for rank, s in zip(ranks, shards)])]
        results[world] = stats[0]
        assert all(abs(s["policy/loss"] - stats[0]["policy/loss"]) < 1e-9 for s in stats), "ranks disagree"
        ranks.kill()
    one, two = results[1], results[2]
    assert abs(one["policy/loss"] - two["policy/loss"]) <= 1e-5 * max(1.0, abs(one["policy/loss"]))
    assert abs(one["learner/grad_norm"] - two["learner/grad_norm"]) <= 1e-4 * one["learner/grad_norm"]
    assert abs(one["correction/ess"] - two["correction/ess"]) < 1e-6
    assert one["learner/grad_norm"] > 0


def test_non_finite_loss_skips_the_update(ray_cluster, job_config, tiny_model_path):
    cfg = job_config(learner={"world_size": 1, "lr": 1e-3})
    group = _group(cfg, tiny_model_path, 1)
    (rank,) = group
    samples = _samples(3)
    samples[0].advantages = [float("nan")] * len(samples[0].advantages)
    before = ray.get(rank.full_state_dict.remote())
    stats, _ = ray.get(rank.train.remote(TrainBatch.from_samples(samples), 1, 0.0))
    after = ray.get(rank.full_state_dict.remote())
    assert stats["learner/skipped_updates"] == 1
    assert all(torch.equal(before[k], after[k]) for k in before), "a NaN step must not change the weights"
    # The next, finite step updates normally.
    stats, _ = ray.get(rank.train.remote(TrainBatch.from_samples(_samples(3)), 2, 0.0))
    assert stats["learner/skipped_updates"] == 0
    assert any(not torch.equal(after[k], v) for k, v in ray.get(rank.full_state_dict.remote()).items())
    group.kill()


def test_micro_batches_accumulate_to_the_full_batch_update(ray_cluster, job_config, tiny_model_path, tmp_path):
    """4 micro-batches (gradient accumulation) give the step of the whole batch at once: same loss,
    same pre-clip gradient norm (a per-micro-batch denominator would scale it), same weights. With
    2 ranks of unequal lengths, the ranks need different micro-batch counts and one pads."""
    samples = _samples(8)
    seq_len = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    runs = {"full": (1, None, [samples]), "micro": (1, 2 * seq_len, [samples]),
            "micro_2_ranks": (2, 2 * seq_len, [samples[:2], samples[2:]])}
    results, weights = {}, {}
    for name, (world, budget, shards) in runs.items():
        cfg = job_config(reference=True,
            run_dir=str(tmp_path / name),
            learner={"world_size": world, "lr": 1e-3, "max_grad_norm": 1e9, "max_tokens_per_micro_batch": budget},
            algorithm={"kl": {"placement": "loss", "coef": 0.1}, "loss": {"aggregation": "token_mean"}},
        )
        ranks = _group(cfg, tiny_model_path, world)
        stats = [m for m, _ in ray.get([rank.train.remote(TrainBatch.from_samples(s), 1, 0.1) for rank, s in zip(ranks, shards)])]
        results[name] = stats[0]
        weights[name] = ray.get([rank.full_state_dict.remote() for rank in ranks])[0]
        ranks.kill()
    full = results["full"]
    for name in ("micro", "micro_2_ranks"):
        got = results[name]
        assert abs(got["policy/loss"] - full["policy/loss"]) <= 1e-5 * max(1.0, abs(full["policy/loss"])), name
        assert abs(got["learner/grad_norm"] - full["learner/grad_norm"]) <= 1e-4 * full["learner/grad_norm"], name
        assert abs(got["learner/tokens"] - full["learner/tokens"]) < 1e-9, name
        diff = max(float((weights[name][k] - weights["full"][k]).abs().max()) for k in weights["full"])
        assert diff < 1e-5, (name, diff)
    assert full["learner/grad_norm"] > 0


def test_gradient_checkpointing_and_bf16_mixed_precision(ray_cluster, job_config, tiny_model_path, tmp_path):
    """Checkpointing recomputes the same activations: the step is unchanged. bf16 compute (FSDP2
    mixed precision over 2 ranks, fp32 master weights and gradient reduction) changes the step only
    by bf16 rounding, and the weights stay fp32."""
    samples = _samples(6)
    settings = {"fp32": ("none", False), "checkpointing": ("none", True), "bf16_checkpointing": ("bf16", True)}
    results, weights = {}, {}
    for name, (precision, checkpointing) in settings.items():
        cfg = job_config(reference=True,
            run_dir=str(tmp_path / name),
            learner={"world_size": 2, "lr": 1e-3, "max_grad_norm": 1e9, "mixed_precision": precision,
                     "gradient_checkpointing": checkpointing},
            algorithm={"kl": {"placement": "loss", "coef": 0.1}, "loss": {"aggregation": "token_mean"}},
        )
        ranks = _group(cfg, tiny_model_path, 2)
        stats = [m for m, _ in ray.get([rank.train.remote(TrainBatch.from_samples(s), 1, 0.1)
                                        for rank, s in zip(ranks, (samples[:2], samples[2:]))])]
        results[name] = stats[0]
        weights[name] = ray.get([rank.full_state_dict.remote() for rank in ranks])[0]
        ranks.kill()
    fp32, ckpt, bf16 = results["fp32"], results["checkpointing"], results["bf16_checkpointing"]
    assert abs(ckpt["policy/loss"] - fp32["policy/loss"]) <= 1e-6 * max(1.0, abs(fp32["policy/loss"]))
    assert abs(ckpt["learner/grad_norm"] - fp32["learner/grad_norm"]) <= 1e-5 * fp32["learner/grad_norm"]
    # bf16 has 8 mantissa bits: the gradient norm agrees to a few percent, not to fp32 precision.
    rel = abs(bf16["learner/grad_norm"] - fp32["learner/grad_norm"]) / fp32["learner/grad_norm"]
    assert 0 < rel < 0.05, rel
    assert all(t.dtype == torch.float32 for t in weights["bf16_checkpointing"].values() if t.is_floating_point())
