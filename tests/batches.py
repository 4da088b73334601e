"""Small train batches for learner tests: rows of chosen prompt and response lengths."""

from __future__ import annotations

import random

from rlhf_cluster.experience.records import ScoredSample, TrainBatch


def ragged_batch(lengths: list[tuple[int, int]], seed: int = 0, vocab: int = 250) -> TrainBatch:
    """One sample per (prompt length, response length), random tokens and advantages (seeded),
    rollout log-probs -5.5 and reference log-probs -5.4."""
    rng = random.Random(seed)
    samples = []
    for i, (p, r) in enumerate(lengths):
        samples.append(ScoredSample(
            sample_id=f"s{i}", prompt_id=f"p{i}", group_id="g", prompt_ids=[rng.randrange(2, vocab) for _ in range(p)],
            response_ids=[rng.randrange(2, vocab) for _ in range(r)], rollout_logprobs=[-5.5] * r, policy_version=0,
            finish_reason="length", reward=0.0, reward_components={}, ref_logprobs=[-5.4] * r,
            advantages=[rng.uniform(-1, 1)] * r))
    return TrainBatch.from_samples(samples)


def full_params(learner) -> dict:
    """A (one-rank FSDP2) learner's parameters, each whole and copied."""
    return {k: v.full_tensor().clone() for k, v in learner.model.state_dict().items()}
