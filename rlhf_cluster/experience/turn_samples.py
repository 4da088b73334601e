"""Agent episodes trained per turn (`generation.agent.samples: turn`): every model turn is its
own sample (`Rollout.episode_id` names its episode), and an episode is still what is rewarded and
compared. Pure functions over a group's rollouts:

- `scored_indices`: which rollouts the reward sources see: whole responses, and of each episode
  its last turn (the answer); `broadcast_scores` gives every turn its episode's.
- `episode_advantages`: the group estimator over one reward per episode, each episode's advantage
  then on every token of each of its turns; an episode of many turns weighs no more in the
  baseline than one of few. (How much its tokens weigh in the loss is the loss normalisation's
  business, `algorithm.loss.aggregation`, as for any sample.)

Routing replay: an agent episode's samples, per turn or whole, carry no routed experts
(`routed_experts` None: the learner routes their tokens itself). A turn's own engine request
routed exactly its sample's context and tokens, so a turn sample could take that routing as it is;
a whole episode would need each model turn's tokens from the request that sampled them, spliced
into one sequence (the context is run again, with other routings, by every later turn).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from rlhf_cluster.experience.records import Rollout

T = TypeVar("T")


def scored_indices(rollouts: Sequence[Rollout]) -> list[int]:
    """Indices of the rollouts to score: every rollout without an episode, and each episode's last turn."""
    last: dict[str, int] = {}
    for i, r in enumerate(rollouts):
        if r.episode_id:
            last[r.episode_id] = i
    return [i for i, r in enumerate(rollouts) if not r.episode_id or last[r.episode_id] == i]


def broadcast_scores(rollouts: Sequence[Rollout], indices: Sequence[int], scores: Sequence[T]) -> list[T]:
    """Every rollout's score: its own (scored at `indices`), or its episode's last turn's."""
    if len(indices) != len(scores):
        raise ValueError(f"{len(scores)} scores for {len(indices)} scored rollouts")
    by_index = dict(zip(indices, scores))
    of_episode = {rollouts[i].episode_id: s for i, s in by_index.items() if rollouts[i].episode_id}
    return [by_index[i] if i in by_index else of_episode[r.episode_id] for i, r in enumerate(rollouts)]


def episode_advantages(
    rollouts: Sequence[Rollout],
    rewards: torch.Tensor,
    group_ids: list[str],
    estimator: Callable[[torch.Tensor, list[str]], tuple[torch.Tensor, dict[str, float]]],
) -> tuple[torch.Tensor, dict[str, float]]:
    """`estimator` over one reward per episode (the mean of its turns'; a rollout without an
    episode is its own), its advantage given to every rollout of that episode; with its metrics."""
    slot: dict[str, int] = {}
    first: list[int] = []
    of_rollout: list[int] = []
    for i, r in enumerate(rollouts):
        key = r.episode_id or f"\0{i}"
        if key not in slot:
            slot[key] = len(first)
            first.append(i)
        of_rollout.append(slot[key])
    members = torch.tensor(of_rollout, dtype=torch.long)
    # The task reward is the episode's on every turn; per-sample shaping (length, KL in the
    # reward) may differ between turns: the episode's reward is their mean.
    totals = torch.zeros(len(first), dtype=rewards.dtype).index_add_(0, members, rewards)
    counts = torch.zeros(len(first), dtype=rewards.dtype).index_add_(0, members, torch.ones_like(rewards))
    adv, metrics = estimator(totals / counts, [group_ids[i] for i in first])
    metrics = {**metrics, "episodes": float(len(first)), "turns_per_episode": len(rollouts) / len(first)}
    return adv[members], metrics
