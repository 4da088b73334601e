"""`scoring.rewards[].concurrency`: a reward worker runs up to that many calls of a slow reward
function at once (threads), results in the responses' order; an `async def` function's coroutine
runs on an event loop of its call's thread (before, it came back as a coroutine: a wrong type)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from pydantic import ValidationError

from rlhf_cluster.config import FunctionReward
from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.scoring.rewards import FAILED, RewardFunctionError, RuleReward

ANSWERS = {"p0": "x", "p1": "yy", "p2": "zzz", "p3": "wwww"}


def _rollouts(texts: list[str]) -> list[Rollout]:
    return [
        Rollout(f"s{i}", f"p{i}", f"g{i}", [1], [2], [0.0], 0, "stop", text) for i, text in enumerate(texts)
    ]


def test_calls_overlap_up_to_the_concurrency_and_keep_their_order():
    """Four calls that each wait for all four to be in flight: they can only finish together. The
    results come back in the responses' order although the calls finish in reverse."""
    barrier = threading.Barrier(4, timeout=20)

    def together(response: str, answer: str) -> float:
        barrier.wait()  # BrokenBarrierError after 20 s unless four calls are in flight at once
        time.sleep(0.05 * (4 - len(response)))  # the last response's call returns first
        return float(len(response) == len(answer))

    reward = RuleReward(None, reward_fn=together, timeout_s=30.0, concurrency=4)
    out = reward.score(_rollouts(["a", "bb", "cc", "dddd"]), ANSWERS)
    assert [r for r, _ in out] == [1.0, 1.0, 0.0, 1.0]
    assert all(c[FAILED] == 0.0 for _, c in out) and (reward.scored, reward.failed) == (4, 0)


def test_an_async_function_is_awaited_and_its_calls_overlap():
    barrier = threading.Barrier(2, timeout=20)

    async def checked(response: str, answer: str, *, prompt_id: str) -> dict[str, float]:
        await asyncio.sleep(0)
        barrier.wait()  # each call's loop runs on its own thread: two calls in flight at once
        return {"reward": float(response == answer), "id": float(prompt_id[-1])}

    out = RuleReward(None, reward_fn=checked, timeout_s=30.0, concurrency=2).score(_rollouts(["x", "no"]), ANSWERS)
    assert out == [(1.0, {"reward": 1.0, "id": 0.0, FAILED: 0.0}), (0.0, {"reward": 0.0, "id": 1.0, FAILED: 0.0})]
    alone = RuleReward(None, reward_fn=lambda r, a: asyncio.sleep(0, result=2.0), timeout_s=5.0)  # a coroutine back
    assert [r for r, _ in alone.score(_rollouts(["x"]), ANSWERS)] == [2.0]


def test_failures_and_timeouts_are_judged_in_order_as_one_at_a_time():
    def flaky(response: str, answer: str) -> float:
        if response == "hang":
            time.sleep(5)  # abandoned at timeout_s; its thread ends on its own
        if response == "bad":
            raise ValueError("no verdict")
        return 1.0

    texts = ["ok", "hang", "bad", "ok"]
    dropped = RuleReward(None, reward_fn=flaky, timeout_s=0.5, concurrency=4, on_error="drop")
    out = dropped.score(_rollouts(texts), ANSWERS)
    assert [c[FAILED] for _, c in out] == [0.0, 1.0, 1.0, 0.0]
    assert (dropped.failed, dropped.timed_out) == (2, 1)
    failing = RuleReward(None, reward_fn=flaky, timeout_s=0.5, concurrency=4, on_error="fail")
    with pytest.raises(RewardFunctionError, match=r"prompt 'p1'.*TimeoutError"):  # the first failure in order
        failing.score(_rollouts(texts), ANSWERS)


def test_the_setting_is_bounded_and_named():
    spec = {"type": "function", "function": "my_rewards:score"}
    assert FunctionReward.model_validate(spec).concurrency == 1
    with pytest.raises(ValidationError, match="concurrency"):
        FunctionReward.model_validate({**spec, "concurrency": 0})
    with pytest.raises(ValueError, match="concurrency=0"):
        RuleReward(None, reward_fn=lambda r, a: 0.0, concurrency=0)
