"""Turn a scored group of rollouts into buffer samples: reward shaping, KL-in-reward, advantages.

This runs before the learner, where a whole group is available, so the learner only recomputes
log-probs and updates.
"""

from __future__ import annotations

import torch

from rlhf_cluster.algorithms import group_advantages, kl_penalty, rloo_advantages
from rlhf_cluster.config import AlgorithmConfig
from rlhf_cluster.records import Rollout, ScoredSample


def build_group(
    rollouts: list[Rollout],
    scores: list[tuple[float, dict[str, float]]],
    ref_logprobs: list[list[float]] | None,
    cfg: AlgorithmConfig,
) -> tuple[list[ScoredSample], dict[str, float]]:
    """Samples of one prompt group with per-token advantages, and group metrics."""
    if not rollouts:
        raise ValueError("build_group needs at least one rollout")
    if len({r.group_id for r in rollouts}) != 1:
        raise ValueError("build_group takes the rollouts of exactly one group")
    if len(scores) != len(rollouts) or (ref_logprobs is not None and len(ref_logprobs) != len(rollouts)):
        raise ValueError("scores and reference log-probs must match the rollouts one to one")
    refs = ref_logprobs if ref_logprobs is not None else [list(r.rollout_logprobs) for r in rollouts]
    rewards = torch.tensor([s[0] for s in scores], dtype=torch.float64)
    components = [dict(s[1]) for s in scores]
    kl_per_seq = torch.tensor(
        [
            float(kl_penalty(torch.tensor(r.rollout_logprobs), torch.tensor(ref), "k1").sum()) if r.response_ids else 0.0
            for r, ref in zip(rollouts, refs)
        ],
        dtype=torch.float64,
    )
    if cfg.kl.placement == "reward" and cfg.kl.coef > 0:
        rewards = rewards - cfg.kl.coef * kl_per_seq
        for c, kl in zip(components, kl_per_seq.tolist()):
            c["kl_penalty"] = -cfg.kl.coef * kl
    group_ids = [r.group_id for r in rollouts]
    if cfg.advantage == "rloo":
        adv, metrics = rloo_advantages(rewards, group_ids)
    else:
        adv, metrics = group_advantages(rewards, group_ids, scale="std" if cfg.advantage == "grpo" else "none")
    samples = [
        ScoredSample(
            sample_id=r.sample_id,
            prompt_id=r.prompt_id,
            group_id=r.group_id,
            prompt_ids=list(r.prompt_ids),
            response_ids=list(r.response_ids),
            rollout_logprobs=list(r.rollout_logprobs),
            policy_version=r.policy_version,
            finish_reason=r.finish_reason,
            reward=float(reward),
            reward_components=c,
            ref_logprobs=list(ref),
            advantages=[float(a)] * len(r.response_ids),
        )
        for r, reward, c, ref, a in zip(rollouts, rewards.tolist(), components, refs, adv.tolist())
    ]
    return samples, metrics


def group_rollouts(rollouts: list[Rollout]) -> dict[str, list[Rollout]]:
    """Rollouts by group id, in arrival order."""
    groups: dict[str, list[Rollout]] = {}
    for r in rollouts:
        groups.setdefault(r.group_id, []).append(r)
    return groups
