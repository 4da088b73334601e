"""benchmarks/spares.py's arithmetic: the gaps around a kill, from the times steps completed."""

from __future__ import annotations

import pytest

from benchmarks.spares import kill_gaps


def test_the_gap_around_the_kill_and_its_delay_over_the_median_step():
    # Steps every 1 s; the kill at 5.5 s; the next step 1 s after the last one (buffered samples),
    # then 3 s (the lost worker's), 1.5 s.
    stamps = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 9.0, 10.5, 11.5]
    gaps = kill_gaps(stamps, killed_at=5.5, warmup=1, after=2)
    assert gaps["median_step_s"] == 1.0 and gaps["gaps_after_kill_s"] == [1.0, 3.0, 1.5]
    assert gaps["delay_s"] == 2.0 and gaps["delay_steps"] == 2.0
    assert gaps["cost_s"] == 2.5 and gaps["cost_steps"] == 2.5  # 5.5 s for three gaps that took 3 s


def test_the_cost_counts_windows_of_gaps_so_alternating_steps_are_not_a_delay():
    # Steps alternate short and long (0.2 s, 0.8 s) before and after the kill: no cost, though the
    # largest gap after it is 0.3 s over the median.
    stamps = [0.0]
    for gap in [0.2, 0.8] * 8:
        stamps.append(stamps[-1] + gap)
    gaps = kill_gaps(stamps, killed_at=stamps[9] + 0.1, warmup=1, after=3)
    assert gaps["gaps_after_kill_s"] == pytest.approx([0.8, 0.2, 0.8, 0.2])
    assert gaps["delay_s"] == pytest.approx(0.3) and gaps["cost_s"] == pytest.approx(0.0, abs=1e-9)


def test_too_few_steps_around_the_kill_is_an_error_not_a_figure():
    with pytest.raises(ValueError, match="too few steps"):
        kill_gaps([0.0, 1.0, 2.0], killed_at=2.5, warmup=1, after=2)
