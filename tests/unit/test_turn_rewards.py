"""Per-turn rewards (rlhf_cluster/rewards/turns.py, environments.py): how the turns' rewards join
the final one, and the example environment that rewards tool calls that ran."""

from __future__ import annotations

import math

import pytest

from rlhf_cluster.config import JobConfig, TurnRewardsConfig
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.environments import BUILT_IN, RewardedToolEnvironment
from rlhf_cluster.rewards.turns import combined_reward


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
