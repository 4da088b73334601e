"""The placebo rewards are reproducible draws that carry no signal."""

from __future__ import annotations

import statistics

from rlhf_cluster.rewards.controls import PlaceboDraws, placebo_arithmetic


def _scores(draws: PlaceboDraws, pairs):
    return [draws.draw(r, a) for r, a in pairs]


def test_placebo_draws_repeat_run_to_run_and_differ_for_a_repeated_response():
    pairs = [(f"{i % 7}", f"{i % 5}") for i in range(400)]
    first, again = _scores(PlaceboDraws(), pairs), _scores(PlaceboDraws(), pairs)
    assert first == again, "the same responses must get the same rewards in a repeated run"
    # The same pairs scored in another order get the same multiset of rewards per pair.
    backwards = PlaceboDraws()
    reordered = dict.fromkeys(set(pairs))
    for pair in reversed(pairs):
        reordered[pair] = sorted((reordered[pair] or []) + [backwards.draw(*pair)])
    forwards: dict = {}
    for pair, value in zip(pairs, first):
        forwards.setdefault(pair, []).append(value)
    assert {p: sorted(v) for p, v in forwards.items()} == reordered
    # A response written again is not rewarded the same: no string is a consistent target.
    draws = PlaceboDraws()
    assert len({draws.draw("7", "7") for _ in range(50)}) == 50
    assert all(0.0 <= v < 1.0 for v in first)
    assert abs(statistics.mean(first) - 0.5) < 0.06 and abs(statistics.pstdev(first) - 12 ** -0.5) < 0.04


def test_placebo_reward_is_blind_to_correctness_but_records_it():
    right = [placebo_arithmetic(str(i), str(i)) for i in range(300)]
    wrong = [placebo_arithmetic(str(i + 1), str(i)) for i in range(300)]
    assert all(r["correct"] == 1.0 for r in right) and all(w["correct"] == 0.0 for w in wrong)
    gap = statistics.mean(r["reward"] for r in right) - statistics.mean(w["reward"] for w in wrong)
    assert abs(gap) < 0.1, gap  # two means of 300 uniform draws differ by 0.024 (one standard error)
