"""Held-out evaluation scores its answers in parts of whole prompts (`actors/evaluation._by_prompt`):
a batch reward function's call sees about a training call's size, never a prompt split."""

from __future__ import annotations

from actors.evaluation import _by_prompt
from rlhf_cluster.experience.records import Rollout


def _rollouts(counts: list[int]) -> list[Rollout]:
    return [
        Rollout(f"s{p}-{i}", f"p{p}", f"g{p}", [1], [2], [0.0], 0, "stop", "x")
        for p, n in enumerate(counts)
        for i in range(n)
    ]


def test_parts_hold_whole_prompts_in_order_up_to_the_size():
    rollouts = _rollouts([3, 3, 3, 5, 1])
    parts = _by_prompt(rollouts, 6)
    assert [[r.prompt_id for r in part] for part in parts] == [
        ["p0"] * 3 + ["p1"] * 3, ["p2"] * 3, ["p3"] * 5 + ["p4"]]  # fmt: skip
    assert [r for part in parts for r in part] == rollouts
    assert [len(part) for part in _by_prompt(_rollouts([8, 2]), 6)] == [8, 2]  # a prompt over the size: alone
    assert _by_prompt([], 6) == []
