"""How often a user function may fail before it counts as broken (`user_code.FailureRate`, shared
by reward functions and agents): so many in a row, or more than a fraction of a full window."""

from __future__ import annotations

import pytest

from rlhf_cluster.user_code import FailureRate


def test_failures_in_a_row_break_it_and_a_success_resets_the_run():
    rate = FailureRate("agent x", max_fraction=1.0, window=100, in_a_row=3)
    assert rate.failed("a") is None and rate.failed("b") is None
    rate.ok()
    assert rate.failed("c") is None and rate.failed("d") is None
    assert rate.failed("e") == "agent x failed on 3 samples in a row; the last: e"


def test_the_rate_is_judged_over_a_full_window_only():
    rate = FailureRate("agent x", max_fraction=0.5, window=4, in_a_row=100)
    assert rate.failed("a") is None and rate.failed("b") is None  # 2 of 2, but the window is not full
    rate.ok()
    assert rate.failed("c") == "agent x failed on 3 of its last 4 samples (75%, more than max_failure_fraction 0.5); the last: c"
    with pytest.raises(ValueError, match="max_failure_fraction=2"):
        FailureRate("x", 2, 4, 1)
