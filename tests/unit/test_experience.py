import math

import pytest

from rlhf_cluster.config import AlgorithmConfig
from rlhf_cluster.experience.build import build_group as _build_group
from rlhf_cluster.experience.build import group_rollouts
from rlhf_cluster.experience.records import Rollout

REWARDS = [1.0, 0.0, 0.5, 0.5]
LENGTHS = [3, 1, 2, 4]


def _rollouts(group="g0", lengths=LENGTHS, version=2):
    return [
        Rollout(
            sample_id=f"{group}-{i}",
            prompt_id="p0",
            group_id=group,
            prompt_ids=[1, 2, 3],
            response_ids=list(range(10, 10 + n)),
            rollout_logprobs=[-1.0] * n,
            policy_version=version,
            finish_reason="stop" if n < 4 else "length",
        )
        for i, n in enumerate(lengths)
    ]


def _scores(rewards=REWARDS):
    return [(r, {"correct": r}) for r in rewards]


def _cfg(advantage="grpo", placement="loss", coef=0.1):
    return AlgorithmConfig(advantage=advantage, kl={"placement": placement, "coef": coef})


def build_group(rollouts, scores, refs, cfg):
    # build_group takes the (possibly adaptive) KL coefficient explicitly; pass the config's.
    return _build_group(rollouts, scores, refs, cfg, kl_coef=cfg.kl.coef, max_new_tokens=16)


def _first_adv(samples):
    return [s.advantages[0] for s in samples]


def test_grpo_advantages_std_scaled_and_broadcast():
    samples, metrics = build_group(_rollouts(), _scores(), None, _cfg("grpo"))
    std = math.sqrt((0.25 + 0.25 + 0 + 0) / 3)  # Bessel
    expected = [(r - 0.5) / (std + 1e-6) for r in REWARDS]
    assert _first_adv(samples) == pytest.approx(expected, rel=1e-6)
    for s, n, a in zip(samples, LENGTHS, expected):
        assert len(s.advantages) == n == len(s.response_ids)
        assert s.advantages == pytest.approx([a] * n, rel=1e-6)
    assert isinstance(metrics, dict)


def test_dr_grpo_advantages_unscaled():
    samples, _ = build_group(_rollouts(), _scores(), None, _cfg("dr_grpo"))
    assert _first_adv(samples) == pytest.approx([0.5, -0.5, 0.0, 0.0])
    assert all(len(set(s.advantages)) == 1 for s in samples)


def test_rloo_advantages_leave_one_out():
    samples, _ = build_group(_rollouts(), _scores(), None, _cfg("rloo"))
    assert _first_adv(samples) == pytest.approx([1 - 1 / 3, 0 - 2 / 3, 0.0, 0.0])


@pytest.mark.parametrize("advantage", ["grpo", "dr_grpo", "rloo"])
def test_constant_rewards_give_zero_advantage(advantage):
    samples, _ = build_group(_rollouts(), _scores([0.3] * 4), None, _cfg(advantage))
    assert all(a == 0.0 for s in samples for a in s.advantages)


def test_fields_carried_over_and_refs_default_to_rollout():
    rollouts = _rollouts(version=7)
    samples, _ = build_group(rollouts, _scores(), None, _cfg())
    for r, s, reward in zip(rollouts, samples, REWARDS):
        assert (s.sample_id, s.prompt_id, s.group_id) == (r.sample_id, r.prompt_id, r.group_id)
        assert s.prompt_ids == r.prompt_ids and s.response_ids == r.response_ids
        assert s.rollout_logprobs == r.rollout_logprobs
        assert s.ref_logprobs == r.rollout_logprobs
        assert s.policy_version == 7
        assert s.finish_reason == r.finish_reason
        assert s.reward == pytest.approx(reward)
        assert s.reward_components == {"correct": reward}


def test_kl_in_reward_subtracts_coef_times_sum_k1():
    rollouts = _rollouts(lengths=[3, 3])
    refs = [[-1.5, -0.5, -2.0], [-1.0, -1.0, -1.0]]  # k1 = logp - ref: sum 1.0 and 0.0
    samples, _ = build_group(rollouts, _scores([1.0, 1.0]), refs, _cfg("dr_grpo", "reward", coef=0.1))
    assert samples[0].reward == pytest.approx(1.0 - 0.1 * 1.0)
    assert samples[1].reward == pytest.approx(1.0)
    assert samples[0].reward_components["kl_penalty"] == pytest.approx(-0.1)
    assert samples[1].reward_components["kl_penalty"] == pytest.approx(0.0)
    assert samples[0].reward_components["correct"] == 1.0  # original components kept
    for s in samples:
        assert s.reward == pytest.approx(1.0 + s.reward_components["kl_penalty"])
    # the advantage sees the penalised reward
    assert _first_adv(samples) == pytest.approx([-0.05, 0.05])
    assert samples[0].ref_logprobs == refs[0]


def test_kl_in_reward_negative_k1_raises_reward():
    rollouts = _rollouts(lengths=[2, 2])
    refs = [[-0.5, -0.5], [-1.0, -1.0]]  # k1 sums: -1.0, 0.0
    samples, _ = build_group(rollouts, _scores([0.0, 0.0]), refs, _cfg("dr_grpo", "reward", coef=0.5))
    assert samples[0].reward == pytest.approx(0.5)


@pytest.mark.parametrize("placement, coef", [("loss", 0.1), ("reward", 0.0)])
def test_kl_in_loss_or_with_zero_coef_leaves_reward_alone(placement, coef):
    rollouts = _rollouts(lengths=[3, 3])
    refs = [[-1.5, -0.5, -2.0], [-1.0, -1.0, -1.0]]
    samples, _ = build_group(rollouts, _scores([1.0, 0.0]), refs, _cfg("grpo", placement, coef=coef))
    assert [s.reward for s in samples] == pytest.approx([1.0, 0.0])
    assert all("kl_penalty" not in s.reward_components for s in samples)


def test_empty_response_gets_no_tokens_and_no_kl():
    rollouts = _rollouts(lengths=[0, 2])
    samples, _ = build_group(rollouts, _scores([0.0, 1.0]), [[], [-2.0, -2.0]], _cfg("dr_grpo", "reward", 1.0))
    assert samples[0].advantages == []
    assert samples[0].reward == pytest.approx(0.0)
    assert samples[1].reward == pytest.approx(1.0 - 2.0)


def test_caller_scores_not_mutated():
    scores = _scores([1.0, 0.0])
    build_group(_rollouts(lengths=[2, 2]), scores, [[-2.0, -2.0]] * 2, _cfg("grpo", "reward", 0.1))
    assert all("kl_penalty" not in comp for _, comp in scores)


def test_mixed_groups_rejected():
    rollouts = _rollouts("g0", [2, 2]) + _rollouts("g1", [2])
    with pytest.raises(ValueError, match="group"):
        build_group(rollouts, _scores([1.0, 0.0, 1.0]), None, _cfg())


def test_empty_group_rejected():
    with pytest.raises(ValueError):
        build_group([], [], None, _cfg())


def test_score_count_mismatch_rejected():
    with pytest.raises(ValueError):
        build_group(_rollouts(), _scores()[:3], None, _cfg())


def test_ref_count_mismatch_rejected():
    with pytest.raises(ValueError):
        build_group(_rollouts(lengths=[2, 2]), _scores([1.0, 0.0]), [[-1.0, -1.0]], _cfg())


def test_ref_length_mismatch_rejected_singleton():
    # one ref value for three tokens: must not be broadcast silently
    with pytest.raises(ValueError, match="reference log-probs"):
        build_group(_rollouts(lengths=[3, 3]), _scores([1.0, 0.0]), [[-1.0], [-1.0] * 3], _cfg("grpo", "reward", 0.1))


def test_ref_length_mismatch_with_kl_in_reward_is_value_error_naming_sample():
    refs = [[-1.0, -1.0], [-1.0] * 3]
    with pytest.raises(ValueError, match="g0-0"):
        build_group(_rollouts(lengths=[3, 3]), _scores([1.0, 0.0]), refs, _cfg("grpo", "reward", 0.1))


def test_ref_length_mismatch_is_value_error_naming_sample():
    refs = [[-1.0, -1.0], [-1.0] * 3]
    with pytest.raises(ValueError, match="g0-0"):
        build_group(_rollouts(lengths=[3, 3]), _scores([1.0, 0.0]), refs, _cfg("grpo", "loss"))


def test_kl_coef_argument_is_used_not_config():
    # the adaptive controller's current value is passed in; it overrides cfg.kl.coef
    rollouts = _rollouts(lengths=[3, 3])
    refs = [[-1.5, -0.5, -2.0], [-1.0, -1.0, -1.0]]  # k1 sums 1.0 and 0.0
    samples, _ = _build_group(
        rollouts, _scores([1.0, 1.0]), refs, _cfg("dr_grpo", "reward", coef=0.1), kl_coef=0.3, max_new_tokens=16
    )
    assert samples[0].reward == pytest.approx(0.7)
    assert samples[0].reward_components["kl_penalty"] == pytest.approx(-0.3)


def test_zero_signal_metric():
    _, flat = build_group(_rollouts(), _scores([0.2] * 4), None, _cfg())
    _, varied = build_group(_rollouts(), _scores(), None, _cfg())
    assert flat["zero_signal"] == 1.0
    assert varied["zero_signal"] == 0.0


def test_dynamic_sampling_compares_the_task_reward_when_told():
    """Right answers told apart only by DAPO's overlong penalty: a signal for the `reward` metric,
    none for `task_reward` (DAPO's accuracy; verl filter_groups.metric acc), which the dapo preset sets."""
    lengths = [3, 1, 2, 4]  # the 4-token answer sits in the overlong buffer of max_new_tokens 4
    shaping = {"overlong_buffer": 2, "dynamic_sampling": True}
    on_reward = AlgorithmConfig(kl={"placement": "none"}, shaping=shaping)
    on_task = AlgorithmConfig(kl={"placement": "none"}, shaping={**shaping, "dynamic_sampling_metric": "task_reward"})
    runs = [_build_group(_rollouts(lengths=lengths), _scores([1.0] * 4), None, c, kl_coef=0.0, max_new_tokens=4)
            for c in (on_reward, on_task)]  # fmt: skip
    assert len({s.reward for s in runs[0][0]}) > 1  # the penalty tells them apart
    assert [metrics["zero_signal"] for _, metrics in runs] == [0.0, 1.0]
    varied = _build_group(_rollouts(), _scores(), None, on_task, kl_coef=0.0, max_new_tokens=4)[1]
    assert varied["zero_signal"] == 0.0
    assert AlgorithmConfig(preset="dapo").shaping.dynamic_sampling_metric == "task_reward"
    assert AlgorithmConfig().shaping.dynamic_sampling_metric == "reward"


def test_a_filter_metric_without_the_filter_is_a_warning():
    from rlhf_cluster.config import load_config
    from rlhf_cluster.job.preflight import preflight

    alone = load_config(None, ["algorithm.shaping.dynamic_sampling_metric=task_reward"])
    assert any("dynamic_sampling_metric=task_reward with dynamic_sampling false" in w for w in preflight(alone))
    dapo = load_config(None, ["algorithm.preset=dapo", "generation.sampling.max_new_tokens=20"])
    assert not any("dynamic_sampling_metric" in w for w in preflight(dapo))


def test_group_rollouts_keeps_arrival_order():
    a, b = _rollouts("ga", [1, 1]), _rollouts("gb", [1])
    groups = group_rollouts([a[0], b[0], a[1]])
    assert list(groups) == ["ga", "gb"]
    assert [r.sample_id for r in groups["ga"]] == ["ga-0", "ga-1"]
