"""Agent turns trained as samples: an episode is rewarded once (its last turn), every turn gets
that reward, and the group's advantages are over episodes, each episode's on all its turns."""

from __future__ import annotations

import pytest
import torch

from rlhf_cluster.algorithms import group_advantages
from rlhf_cluster.config import AlgorithmConfig
from rlhf_cluster.experience.build import build_group
from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.experience.turn_samples import broadcast_scores, episode_advantages, scored_indices


def _turn(episode: str, k: int, n: int = 2) -> Rollout:
    return Rollout(sample_id=f"{episode}:t{k}" if episode else f"s{k}", prompt_id="p", group_id="g",
                   prompt_ids=[1, 2, 3 + k], response_ids=[5] * n, rollout_logprobs=[-0.5] * n, policy_version=0,
                   finish_reason="stop", episode_id=episode)


def test_an_episode_is_scored_on_its_last_turn_and_every_turn_gets_that_score():
    rollouts = [_turn("e0", 0), _turn("e0", 1), _turn("e1", 0), _turn("", 7), _turn("e0", 2)]
    indices = scored_indices(rollouts)
    assert indices == [2, 3, 4]  # e1's only turn, the plain rollout, e0's last turn
    assert broadcast_scores(rollouts, indices, ["e1", "plain", "e0"]) == ["e0", "e0", "e1", "plain", "e0"]
    with pytest.raises(ValueError, match="2 scores for 3"):
        broadcast_scores(rollouts, indices, ["a", "b"])


def test_advantages_are_over_episodes_whatever_their_turn_counts():
    # Episode a: 3 turns, reward 1; episode b: 1 turn, reward 0. Over turns the mean would be 0.75.
    rollouts = [_turn("a", 0), _turn("a", 1), _turn("a", 2), _turn("b", 0)]
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    adv, metrics = episode_advantages(rollouts, rewards, ["g"] * 4,
                                      lambda r, g: group_advantages(r, g, scale="none"))
    assert adv.tolist() == [0.5, 0.5, 0.5, -0.5]
    assert metrics["episodes"] == 2.0 and metrics["turns_per_episode"] == 2.0


def test_a_group_of_turn_samples_builds_with_each_episodes_advantage_on_its_tokens():
    rollouts = [_turn("a", 0), _turn("a", 1, n=3), _turn("b", 0, n=4)]
    scores = [(1.0, {"correct": 1.0}), (1.0, {"correct": 1.0}), (0.0, {"correct": 0.0})]
    samples, metrics = build_group(rollouts, scores, None, AlgorithmConfig(advantage="dr_grpo"), kl_coef=0.0,
                                   max_new_tokens=8)
    assert [s.advantages for s in samples] == [[0.5] * 2, [0.5] * 3, [-0.5] * 4]
    assert metrics["zero_signal"] == 0.0


def test_preflight_refuses_turn_samples_beside_turn_level_credit():
    from rlhf_cluster.config import JobConfig
    from rlhf_cluster.job import agents

    def cfg(samples: str, assign: str) -> JobConfig:
        return JobConfig.model_validate({"generation": {
            "agent": {"function": "my_agent:run", "samples": samples},
            "turn_rewards": {"combine": "sum", "assign": assign}}})

    (problem,) = agents.rules(cfg("turn", "turn"))
    assert "generation.agent.samples: turn" in problem and "turn_rewards.assign: episode" in problem
    assert agents.rules(cfg("auto", "turn")) == [] and agents.rules(cfg("turn", "episode")) == []
