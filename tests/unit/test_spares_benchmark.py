"""benchmarks/spares.py's arithmetic: the gaps around a kill, from the times steps completed."""

from __future__ import annotations

import pytest

from benchmarks.spares import kill_gaps


def test_the_gap_around_the_kill_and_its_delay_over_the_median_step():
    # Steps every 1 s; the kill at 5.5 s; the next step 1 s after the last one (buffered samples),
    # then 3 s (the lost worker's), 1.5 s, 1 s.
    stamps = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 9.0, 10.5, 11.5]
    gaps = kill_gaps(stamps, killed_at=5.5, warmup=1, after=2)
    assert gaps["median_step_s"] == 1.0 and gaps["gaps_after_kill_s"] == [1.0, 3.0, 1.5]
    assert gaps["delay_s"] == 2.0 and gaps["delay_steps"] == 2.0 and gaps["total_excess_s"] == 2.5


def test_too_few_steps_around_the_kill_is_an_error_not_a_figure():
    with pytest.raises(ValueError, match="too few steps"):
        kill_gaps([0.0, 1.0, 2.0], killed_at=2.5, warmup=1, after=2)
