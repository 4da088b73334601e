"""Per-turn rewards (rlhf_cluster/rewards/turns.py, environments.py): how the turns' rewards join
the final one, and the example environment that rewards tool calls that ran."""

from __future__ import annotations

import math

import pytest

import torch

from rlhf_cluster.algorithms.advantages import group_advantages, rloo_advantages, turn_level_advantages
from rlhf_cluster.config import AlgorithmConfig, JobConfig, TurnRewardsConfig
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.generation.environments import BUILT_IN, RewardedToolEnvironment
from rlhf_cluster.experience.build import build_group
from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.rewards.turns import combined_reward, turn_returns


@pytest.mark.parametrize("combine,expected", [("sum", 1.0 + 0.6), ("last", 1.0 + 0.3), ("weighted", 1.0 + 0.5 * 0.6)])
def test_turn_rewards_join_the_final_one_as_configured(combine, expected):
    reward, parts = combined_reward(1.0, {"correct": 1.0}, [0.1, 0.2, 0.3], TurnRewardsConfig(combine=combine, weight=0.5))
    assert reward == pytest.approx(expected)
    assert parts["correct"] == 1.0 and parts["final_reward"] == 1.0 and parts["turn_reward"] == pytest.approx(expected - 1.0)


def test_without_combining_or_turns_the_final_reward_stands_and_a_failed_one_stays_failed():
    assert combined_reward(0.5, {"c": 1.0}, [0.2], TurnRewardsConfig()) == (0.5, {"c": 1.0})
    assert combined_reward(0.5, {"c": 1.0}, [], TurnRewardsConfig(combine="sum")) == (0.5, {"c": 1.0})
    failed, _ = combined_reward(float("nan"), {}, [0.2], TurnRewardsConfig(combine="sum"))
    assert math.isnan(failed)  # still a failed reward: the sample is dropped as before


def test_the_rewarded_tool_environment_pays_for_calls_that_ran():
    env = BUILT_IN["tools_rewarded"]()
    assert isinstance(env, RewardedToolEnvironment)
    env.reset(Prompt("p", "2+3=", "5"))
    ran = env.step("<calculator>2+3</calculator>")
    assert ran.reward == pytest.approx(RewardedToolEnvironment.CALL_REWARD) and "5" in ran.observation
    failed = env.step("<calculator>2+</calculator>")
    assert failed.reward == 0.0 and failed.info["tool_errors"] == 1
    assert env.step("the answer is 5").reward == 0.0 and env.step("x").done


def test_turn_rewards_config_is_strict():
    with pytest.raises(ValueError, match="combine"):
        JobConfig.model_validate({"generation": {"turn_rewards": {"combine": "mean"}}})


# ---- turn-level credit (`assign: turn`) ------------------------------------------------------

def test_a_turns_return_is_what_followed_it_discounted_per_turn():
    # Turns earned 0.1, 0.2, 0.3 (added by `sum`); the final reward 1.0 and shaping -0.1 arrive at the end.
    cfg = TurnRewardsConfig(combine="sum", assign="turn")
    episode = 1.0 - 0.1 + 0.6
    assert turn_returns(episode, [0.1, 0.2, 0.3], cfg) == pytest.approx([1.5, 1.4, 1.2])
    discounted = turn_returns(episode, [0.1, 0.2, 0.3], cfg.model_copy(update={"gamma": 0.5}))
    assert discounted == pytest.approx([0.1 + 0.5 * (0.2 + 0.5 * (0.3 + 0.9)), 0.2 + 0.5 * (0.3 + 0.9), 0.3 + 0.9])
    weighted = TurnRewardsConfig(combine="weighted", weight=0.5, assign="turn")
    assert turn_returns(1.0 + 0.5 * 0.6, [0.1, 0.2, 0.3], weighted) == pytest.approx([1.3, 1.25, 1.15])
    assert turn_returns(0.7, [], cfg) == [0.7]


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_turn_level_advantages_use_the_episode_baseline_for_every_turn(estimator):
    episode = [1.5, 0.5, 1.0, 0.0]
    returns = [torch.tensor([1.5, 1.4, 1.2]), torch.tensor([0.5, 0.5]), torch.tensor([1.0]), torch.tensor([0.0, -0.2])]
    per_turn, _ = turn_level_advantages(returns, ["g"] * 4, estimator)
    if estimator == "rloo":
        first, _ = rloo_advantages(torch.tensor(episode), ["g"] * 4)
    else:
        first, _ = group_advantages(torch.tensor(episode), ["g"] * 4, scale="std" if estimator == "grpo" else "none")
    # The first turn's advantage is the estimator's episode-level one...
    assert torch.allclose(torch.stack([a[0] for a in per_turn]), first.float(), atol=1e-6)
    # ...and a later turn's differs from it by the return it no longer counts, over the same scale.
    # (RLOO's baseline leaves the sample out, so its scale is 1; GRPO's is 1 / the group's std)
    scale = 1.0 if estimator == "rloo" else float((first[0] - first[1]) / (episode[0] - episode[1]))
    assert float(per_turn[0][2] - per_turn[0][0]) == pytest.approx((1.2 - 1.5) * scale, rel=1e-5)
    assert float(per_turn[3][1] - per_turn[3][0]) == pytest.approx(-0.2 * scale, rel=1e-5)
    # A group whose episodes all returned the same gets nothing, whatever its turns earned.
    flat, _ = turn_level_advantages([torch.tensor([1.0, 0.5]), torch.tensor([1.0])], ["h", "h"], estimator)
    assert all(float(a.abs().max()) == 0.0 for a in flat)


def _episode(i: int, turns: list[tuple[int, int, float]], observation_first: int = 0) -> Rollout:
    """A rollout whose model turns are (tokens, observation tokens after it, turn reward)."""
    ids, mask, starts, rewards = [7] * observation_first, [0] * observation_first, [], []
    for n, obs, reward in turns:
        starts.append(len(ids))
        ids += [5] * n + [6] * obs
        mask += [1] * n + [0] * obs
        rewards.append(reward)
    return Rollout(sample_id=f"s{i}", prompt_id="p", group_id="g", prompt_ids=[1], response_ids=ids,
                   rollout_logprobs=[-1.0] * len(ids), policy_version=0, finish_reason="stop", loss_mask=mask,
                   turn_rewards=rewards, turn_starts=starts)


def test_build_group_gives_each_turns_tokens_its_turns_advantage():
    cfg = AlgorithmConfig(advantage="dr_grpo", kl={"coef": 0.0})
    turns = TurnRewardsConfig(combine="sum", assign="turn")
    rollouts = [_episode(0, [(2, 3, 0.1), (1, 0, 0.0)], observation_first=1), _episode(1, [(3, 0, 0.0)])]
    scores = [combined_reward(final, {}, r.turn_rewards, turns) for final, r in zip([1.0, 0.0], rollouts)]
    samples, _ = build_group(rollouts, scores, None, cfg, kl_coef=0.0, max_new_tokens=16, turns=turns)
    # Episode returns 1.1 and 0.0 (mean 0.55): the first episode's first turn +0.55, its second turn
    # (which earned the final 1.0 but not the 0.1 before it) +0.45; the opening observation 0.
    assert samples[0].advantages == pytest.approx([0.0] + [0.55] * 5 + [0.45])
    assert samples[1].advantages == pytest.approx([-0.55] * 3)
    assert samples[0].reward == pytest.approx(1.1)  # the episode's reward is unchanged
    episode_level, _ = build_group(rollouts, scores, None, cfg, kl_coef=0.0, max_new_tokens=16, turns=None)
    assert episode_level[0].advantages == pytest.approx([0.55] * 7)


def test_turn_credit_needs_added_turn_rewards_and_a_group_estimator():
    with pytest.raises(ValueError, match="combine must be 'sum' or 'weighted', not 'last'"):
        TurnRewardsConfig(combine="last", assign="turn")
    with pytest.raises(ValueError, match="algorithm.advantage 'reinforce_pp' places rewards per token itself"):
        JobConfig.model_validate({"generation": {"turn_rewards": {"combine": "sum", "assign": "turn"}},
                                  "algorithm": {"advantage": "reinforce_pp"}})
    with pytest.raises(ValueError, match="turn starts"):
        Rollout(sample_id="s", prompt_id="p", group_id="g", prompt_ids=[1], response_ids=[5, 5], rollout_logprobs=[0.0] * 2,
                policy_version=0, finish_reason="stop", turn_rewards=[0.1], turn_starts=[3])
