"""The advantage estimators' registry (`algorithms.advantages.ESTIMATORS`): every name the config
accepts has an entry, each entry gives the numbers its estimator always gave, and an unknown name
is refused naming the field and the known names."""

import math
import typing

import pydantic
import pytest
import torch

from rlhf_cluster.algorithms import ESTIMATORS, estimator, filled_at_take_time
from rlhf_cluster.config import AlgorithmConfig
from rlhf_cluster.config.algorithm import GROUP_ADVANTAGES
from rlhf_cluster.experience.build import build_group
from rlhf_cluster.experience.records import Rollout

REWARDS = [1.0, 0.0, 0.5, 0.5]
_STD = math.sqrt(0.5 / 3)  # the group's std with Bessel's correction
# Each estimator's advantages of REWARDS (one group), as the `if/elif` it replaced computed them.
EXPECTED = {
    "grpo": [0.5 / (_STD + 1e-6), -0.5 / (_STD + 1e-6), 0.0, 0.0],
    "dr_grpo": [0.5, -0.5, 0.0, 0.0],
    "rloo": [1.0 - 1.0 / 3, 0.0 - 2.0 / 3, 0.0, 0.0],
    "reinforce_pp_baseline": [0.5, -0.5, 0.0, 0.0],  # the group's half; whitened over the batch at take time
    "reinforce_pp": [0.0] * 4,  # filled in at take time (finalize_batch)
    "gae": [0.0] * 4,
}


def _rollouts():
    return [
        Rollout(
            sample_id=f"s{i}",
            prompt_id="p",
            group_id="g",
            prompt_ids=[1, 2],
            response_ids=list(range(n)),
            rollout_logprobs=[-1.0] * n,
            policy_version=0,
            finish_reason="stop",
        )
        for i, n in enumerate([3, 1, 2, 4])
    ]


def test_the_registry_holds_exactly_the_names_the_config_accepts():
    accepted = typing.get_args(AlgorithmConfig.model_fields["advantage"].annotation)
    assert sorted(accepted) == sorted(ESTIMATORS) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_estimator_looked_up_by_name_gives_its_numbers(name):
    fn = estimator(name)
    assert fn is ESTIMATORS[name]
    adv, _ = fn(torch.tensor(REWARDS, dtype=torch.float64), ["g"] * 4)
    assert adv.tolist() == pytest.approx(EXPECTED[name])
    cfg = AlgorithmConfig(advantage=name, kl={"placement": "loss", "coef": 0.0})
    samples, metrics = build_group(_rollouts(), [(r, {}) for r in REWARDS], None, cfg, kl_coef=0.0, max_new_tokens=8)
    for s, want in zip(samples, EXPECTED[name]):
        assert s.advantages == pytest.approx([want] * len(s.response_ids))
    assert metrics["zero_signal"] == 0.0


def test_only_reinforce_pp_and_gae_are_filled_in_at_take_time():
    assert {name for name in ESTIMATORS if filled_at_take_time(name)} == {"reinforce_pp", "gae"}
    # The rest are the group estimators the config's checks know (a group per prompt, n >= 2).
    assert {name for name in ESTIMATORS if not filled_at_take_time(name)} == set(GROUP_ADVANTAGES)


def test_an_unknown_estimator_is_refused_naming_the_field_and_the_known_names():
    with pytest.raises(ValueError, match=r"algorithm\.advantage: unknown estimator 'grpoo'; known: dr_grpo, gae, grpo"):
        estimator("grpoo")
    with pytest.raises(pydantic.ValidationError, match=r"(?s)advantage.*'grpo', 'dr_grpo', 'rloo'"):
        AlgorithmConfig(advantage="grpoo")
