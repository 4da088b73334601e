import pytest
import torch

from rlhf_cluster.rewards import (
    dynamic_sampling_filter,
    ensemble,
    length_penalty,
    overlong_filter_mask,
    overlong_penalty,
)


def test_overlong_penalty():
    out = overlong_penalty([0, 60, 80, 90, 100, 150], max_len=100, buffer_len=40, penalty=1.0)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, -0.5, -0.75, -1.0, -1.0]))
    out = overlong_penalty(torch.tensor([60, 90]), max_len=100, buffer_len=40, penalty=2.0)
    torch.testing.assert_close(out, torch.tensor([0.0, -1.5]))
    for L in range(0, 120, 7):
        want = 0.0 if L <= 60 else (-(L - 60) / 40 if L <= 100 else -1.0)
        assert overlong_penalty([L], 100, 40).item() == pytest.approx(want)
    torch.testing.assert_close(overlong_penalty([100, 101], 100, 0), torch.tensor([0.0, -1.0]))


def test_length_penalty():
    torch.testing.assert_close(length_penalty([400, 500, 750], 500, 0.001), torch.tensor([0.0, 0.0, -0.25]))


def test_ensemble():
    s = torch.tensor([[1.0, 2.0], [3.0, 0.0], [2.0, 1.0]])
    torch.testing.assert_close(ensemble(s), torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(ensemble(list(s), how="min"), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="mean, min"):
        ensemble(s, how="max")


def test_overlong_filter_mask():
    out = overlong_filter_mask(["stop", "length", "abort", "stop"])
    assert out.dtype == torch.bool and out.tolist() == [True, False, True, True]


def test_dynamic_sampling_filter():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5])
    keep, met = dynamic_sampling_filter(r, ["a", "a", "b", "b", "c", "c", "d"])
    assert keep.tolist() == [False, False, True, True, False, False, False]
    assert met == {"groups_dropped": 3.0, "groups_kept": 1.0}
    keep, _ = dynamic_sampling_filter(r, torch.tensor([0, 0, 1, 1, 2, 2, 3]))
    assert keep.tolist() == [False, False, True, True, False, False, False]


# What production does with these: scoring a group (`build_group`), finalising a step's batch
# (`finalize_batch`) and the reward-model ensemble (`combine_rewards`) call them and give exactly
# their values, edge cases included (a singleton group, -0.0, a tiny reward difference).

def _group(lengths, finish, group="g0"):
    from rlhf_cluster.experience.records import Rollout

    return [Rollout(f"{group}-{i}", "p0", group, [1, 2], list(range(3, 3 + n)), [-1.0] * n, 0, f)
            for i, (n, f) in enumerate(zip(lengths, finish))]


def test_build_group_applies_the_overlong_and_length_penalties():
    from rlhf_cluster.config import AlgorithmConfig
    from rlhf_cluster.experience.build import build_group

    lengths, max_len = [2, 9, 13, 16], 16
    cfg = AlgorithmConfig(advantage="grpo", kl={"placement": "loss", "coef": 0.0},
                          shaping={"overlong_buffer": 8, "overlong_penalty": 2.0, "length_target": 10, "length_coef": 0.1})
    samples, _ = build_group(_group(lengths, ["stop"] * 4), [(1.0, {})] * 4, None, cfg, kl_coef=0.0, max_new_tokens=max_len)
    overlong = overlong_penalty(lengths, max_len, 8, 2.0).tolist()
    length = length_penalty(lengths, 10, 0.1).tolist()
    assert [s.reward_components["overlong"] for s in samples] == pytest.approx(overlong, abs=1e-6)
    assert [s.reward_components["length"] for s in samples] == pytest.approx(length, abs=1e-6)
    assert [s.reward for s in samples] == pytest.approx([1.0 + o + p for o, p in zip(overlong, length)], abs=1e-6)


@pytest.mark.parametrize("rewards", [[0.5, 0.5, 0.5], [0.5, 0.5, 0.25], [1.0], [0.0, -0.0], [1e-12, 0.0]])
def test_build_group_zero_signal_is_the_dynamic_sampling_verdict(rewards):
    from rlhf_cluster.config import AlgorithmConfig
    from rlhf_cluster.experience.build import build_group

    cfg = AlgorithmConfig(advantage="grpo", kl={"placement": "loss", "coef": 0.0}, shaping={"dynamic_sampling": True})
    n = len(rewards)
    _, metrics = build_group(_group([2] * n, ["stop"] * n), [(r, {}) for r in rewards], None, cfg, kl_coef=0.0,
                             max_new_tokens=8)
    keep, _ = dynamic_sampling_filter(torch.tensor(rewards, dtype=torch.float64), ["g0"] * n)
    assert metrics["zero_signal"] == float(not keep.any())


@pytest.mark.parametrize("enabled", [True, False])
def test_finalize_batch_in_loss_is_the_overlong_filter(enabled):
    from rlhf_cluster.config import AlgorithmConfig
    from rlhf_cluster.experience.build import build_group, finalize_batch

    finish = ["stop", "length", "abort", "length"]
    cfg = AlgorithmConfig(advantage="grpo", kl={"placement": "loss", "coef": 0.0}, shaping={"overlong_filter": enabled})
    samples, _ = build_group(_group([2, 8, 3, 8], finish), [(float(i), {}) for i in range(4)], None, cfg, kl_coef=0.0,
                             max_new_tokens=8)
    batch, metrics = finalize_batch(samples, cfg, 0.0)
    want = overlong_filter_mask(finish).tolist() if enabled else [True] * 4
    assert batch.in_loss == want and metrics["samples_in_loss"] == sum(want)


@pytest.mark.parametrize("how", ["mean", "min"])
def test_combine_rewards_uses_the_ensemble(how):
    from rlhf_cluster.scoring.rewards import combine_rewards

    models = {"a": [0.5, -1.0, 0.1], "b": [1.5, 0.0, 0.2], "c": [-0.25, 2.0, 0.3]}
    out = combine_rewards([(0.0, {})] * 3, models, rule_weight=0.0, model_weight=1.0, combine=how)
    want = ensemble(torch.tensor(list(models.values()), dtype=torch.float64), how=how).tolist()
    assert [c["rm"] for _, c in out] == want
    assert [r for r, _ in out] == want
