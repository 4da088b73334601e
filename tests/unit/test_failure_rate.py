"""How often a user function may fail before it counts as broken (`user_code.FailureRate`, shared
by reward functions and agents): so many in a row, or more than a fraction of a full window."""

from __future__ import annotations

import pytest

from rlhf_cluster.user_code import FailureRate


def test_first_calls_all_failing_break_it():
    rate = FailureRate("agent x", max_fraction=1.0, window=100, in_a_row=3)
    assert rate.failed("a") is None and rate.failed("b") is None
    assert rate.failed("c") == "agent x failed on 3 samples in a row; the last: c"


def test_a_function_that_worked_rides_out_an_outage_judged_by_the_rate_alone():
    """Found by the soak (issue 58): a reward function failing for 12 s after working for minutes
    stopped the job at 32 failures in a row, though `max_failure_fraction` was 1."""
    rate = FailureRate("reward fn", max_fraction=1.0, window=100, in_a_row=3)
    rate.ok()
    assert all(rate.failed(str(i)) is None for i in range(500))
    strict = FailureRate("reward fn", max_fraction=0.5, window=4, in_a_row=3)
    strict.ok()
    assert strict.failed("a") is None and strict.failed("b") is None
    assert strict.failed("c") == "reward fn failed on 3 of its last 4 samples (75%, more than max_failure_fraction 0.5); the last: c"


def test_the_rate_is_judged_over_a_full_window_only():
    rate = FailureRate("agent x", max_fraction=0.5, window=4, in_a_row=100)
    assert rate.failed("a") is None and rate.failed("b") is None  # 2 of 2, but the window is not full
    rate.ok()
    assert rate.failed("c") == "agent x failed on 3 of its last 4 samples (75%, more than max_failure_fraction 0.5); the last: c"
    with pytest.raises(ValueError, match="max_failure_fraction=2"):
        FailureRate("x", 2, 4, 1)
