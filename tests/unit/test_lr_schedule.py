"""The one learning-rate schedule every optimizer in the project uses (`learner/schedule.py`)."""

from __future__ import annotations

import math

import pytest

from rlhf_cluster.learner.schedule import lr_multiplier


def test_constant_after_linear_warmup():
    assert [lr_multiplier(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_multiplier(0) == lr_multiplier(10**6) == 1.0


def test_cosine_falls_from_peak_to_the_floor_at_the_last_step():
    total, warmup, floor = 100, 10, 0.1
    values = [lr_multiplier(s, warmup, total, "cosine", floor) for s in range(total)]
    assert values[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    after = values[warmup:]
    assert after[0] == pytest.approx(1.0) and after[-1] == pytest.approx(floor)
    assert all(a >= b for a, b in zip(after, after[1:]))  # never rises again
    middle = warmup + (total - 1 - warmup) / 2
    assert lr_multiplier(int(middle), warmup, total, "cosine", 0.0) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * (int(middle) - warmup) / (total - 1 - warmup))))
    assert lr_multiplier(total + 5, warmup, total, "cosine", floor) == pytest.approx(floor)  # past the end: the floor


def test_bad_schedule_names_itself():
    with pytest.raises(ValueError, match="'linear'"):
        lr_multiplier(5, 0, 10, "linear")
    with pytest.raises(ValueError, match="total_steps"):
        lr_multiplier(5, 0, None, "cosine")
