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
