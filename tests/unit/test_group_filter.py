"""`algorithm.shaping.group_filter`: dynamic sampling's test as the user's own function (slime's
`--dynamic-sampling-filter-path`), called with each scored group's samples; refusals by name."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rlhf_cluster.config import AlgorithmConfig, ConfigError, load_config
from rlhf_cluster.experience.build import build_group
from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.job.preflight import preflight

HERE = "tests.unit.test_group_filter"


def one_right_answer_at_least(samples) -> bool:
    """Keep groups with a right answer (the all-wrong are dropped; the all-right kept)."""
    for s in samples:
        s.reward = -1.0  # a copy: the group is not the filter's to change
    return any(s.reward_components["correct"] for s in samples)


def says_yes(samples):
    return "yes"


def _group(correct: list[float]):
    rollouts = [Rollout(f"g-{i}", "p", "g", [1, 2], [3, 4, 5], [-1.0] * 3, 0, "stop") for i in range(len(correct))]
    return rollouts, [(c, {"correct": c}) for c in correct]


def _cfg(**shaping) -> AlgorithmConfig:
    return AlgorithmConfig(kl={"placement": "none"}, shaping={"dynamic_sampling": True, **shaping})


def _zero_signal(correct: list[float], cfg: AlgorithmConfig) -> float:
    rollouts, scores = _group(correct)
    samples, metrics = build_group(rollouts, scores, None, cfg, kl_coef=0.0, max_new_tokens=8)
    assert [s.reward for s in samples] == correct  # the filter changed its copies only
    return metrics["zero_signal"]


def test_the_users_filter_decides_which_groups_dynamic_sampling_drops():
    mine = _cfg(group_filter=f"{HERE}:one_right_answer_at_least")
    assert [_zero_signal(c, mine) for c in ([1.0, 1.0], [0.0, 0.0], [1.0, 0.0])] == [0.0, 1.0, 0.0]
    built_in = _cfg()  # all-equal groups dropped, whichever the value
    assert [_zero_signal(c, built_in) for c in ([1.0, 1.0], [0.0, 0.0], [1.0, 0.0])] == [1.0, 1.0, 0.0]


def test_a_filter_that_answers_no_bool_or_cannot_be_found_is_refused_by_name(tmp_path):
    with pytest.raises(TypeError, match=r"algorithm.shaping.group_filter=.*says_yes.* returned a str"):
        _zero_signal([1.0, 0.0], _cfg(group_filter=f"{HERE}:says_yes"))
    with pytest.raises(ValidationError, match="group_filter is dynamic sampling's test"):
        AlgorithmConfig(shaping={"group_filter": f"{HERE}:says_yes"})
    with pytest.raises(ValidationError, match="dynamic_sampling_metric"):
        _cfg(group_filter=f"{HERE}:says_yes", dynamic_sampling_metric="task_reward")
    missing = load_config(None, ["algorithm.shaping.dynamic_sampling=true",
                                 "algorithm.shaping.group_filter=no_such_module_here:keep"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"algorithm.shaping.group_filter='no_such_module_here:keep': module"):
        preflight(missing)
    assert preflight(load_config(None, ["algorithm.shaping.dynamic_sampling=true",
                                        f"algorithm.shaping.group_filter={HERE}:says_yes"])) == []  # fmt: skip
