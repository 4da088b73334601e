"""`scoring.rewards[].batch: true`: a TRL-shaped reward function (lists by keyword, a list back)
called once per scoring call, its failures judged per sample as a per-sample function's are."""

from __future__ import annotations

import asyncio
import copy
import threading

import numpy as np
import pytest
from pydantic import ValidationError

from rlhf_cluster.config import ConfigError, FunctionReward, JobConfig
from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.scoring.rewards import (
    BROKEN_AFTER,
    FAILED,
    RewardContext,
    RewardFunctionError,
    RuleReward,
    load_reward_fn,
)

CONTEXTS = {
    "p0": RewardContext("4", "2+2=", "math", {"level": 1, "tests": [["1", "2"]]}),
    "p1": RewardContext("1", "print(1)", "code", {"level": 3}),  # a row without `tests`
}
FIXED = ["completions", "prompts", "completion_ids", "answer", "source", "prompt_id",
         "solution_strs", "ground_truths", "data_sources", "extra_infos"]  # fmt: skip


def _rollouts(texts: list[str], prompt_ids: list[str] | None = None) -> list[Rollout]:
    ids = prompt_ids or ["p0", "p1"] * (len(texts) // 2) + ["p0"] * (len(texts) % 2)
    return [
        Rollout(f"s{i}", pid, f"g{pid}", [1, 2], [10 + i, 20 + i], [0.0, 0.0], 0, "stop", text)
        for i, (pid, text) in enumerate(zip(ids, texts))
    ]


def test_a_trl_shaped_function_scores_the_whole_batch_in_one_call():
    calls: list[dict] = []

    def accuracy(completions, answer, **kwargs):  # TRL's reward_funcs shape
        calls.append({"completions": completions, "answer": answer, **kwargs})
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    reward = RuleReward(None, reward_fn=accuracy, batch=True)
    out = reward.score(_rollouts(["4", "2", "5", "1"]), CONTEXTS)
    assert [r for r, _ in out] == [1.0, 0.0, 0.0, 1.0]
    assert all(c == {FAILED: 0.0} for _, c in out)
    (got,) = calls  # ONE call for the four responses
    assert sorted(got) == sorted(FIXED + ["level", "tests"])
    assert got["prompts"] == ["2+2=", "print(1)"] * 2 and got["source"] == ["math", "code"] * 2
    assert got["completion_ids"] == [[10, 20], [11, 21], [12, 22], [13, 23]]
    assert got["prompt_id"] == ["p0", "p1", "p0", "p1"] and got["level"] == [1, 3, 1, 3]
    assert got["tests"] == [[["1", "2"]], None, [["1", "2"]], None]  # a row lacking the column: None
    assert (reward.scored, reward.failed, reward.timed_out) == (4, 0, 0)


def test_a_function_written_for_verls_batch_reward_manager_runs_unchanged():
    def compute_score(data_sources, solution_strs, ground_truths, extra_infos, **kwargs):  # verl's keywords
        assert data_sources == ["math", "code"] and extra_infos == [CONTEXTS["p0"].extra, CONTEXTS["p1"].extra]
        extra_infos[0]["level"] = 99  # a copy: the row stays as it is
        return [float(s == g) for s, g in zip(solution_strs, ground_truths)]

    reward = RuleReward(None, reward_fn=compute_score, batch=True)
    assert [r for r, _ in reward.score(_rollouts(["4", "0"]), CONTEXTS)] == [1.0, 0.0]
    assert CONTEXTS["p0"].extra["level"] == 1


def test_a_verl_batch_function_gets_the_extra_info_column_and_its_score_dicts_are_read_as_verl_reads_them():
    contexts = {"p0": RewardContext("4", "2+2=", "math", {"extra_info": {"index": 3}})}

    def compute_score(data_sources, solution_strs, ground_truths, extra_infos):
        assert extra_infos == [{"index": 3}] * 2  # the row's extra_info column itself, as verl passes it
        return [{"score": float(s == g), "acc": s == g, "pred": s} for s, g in zip(solution_strs, ground_truths)]

    out = RuleReward(None, reward_fn=compute_score, batch=True).score(_rollouts(["4", "5"], ["p0", "p0"]), contexts)
    assert out == [(1.0, {"reward": 1.0, "acc": 1.0, FAILED: 0.0}), (0.0, {"reward": 0.0, "acc": 0.0, FAILED: 0.0})]


def test_an_extra_column_named_as_a_fixed_argument_is_refused_and_positional_only_names_are_not_passed():
    def by_answer(completions, answer):
        return [0.0] * len(completions)

    from rlhf_cluster.scoring.batch_rewards import batch_keywords

    with pytest.raises(ValueError, match=r"data.columns.extra lists \['answer'\].*would be hidden"):
        batch_keywords(by_answer, "scoring.rewards[0].function", ["answer"])

    def star(completions, *prompts):  # `prompts` cannot be passed by keyword: never given so
        return [float(not prompts) for _ in completions]

    assert [r for r, _ in RuleReward(None, reward_fn=star, batch=True).score(_rollouts(["a"]), CONTEXTS)] == [1.0]


def test_only_the_names_the_signature_has_are_given_and_extra_values_are_copies():
    seen: list[tuple] = []

    def picky(prompt_id, tests, level=0, unused=5):
        seen.append(copy.deepcopy((prompt_id, tests, level, unused)))
        for t in tests:
            if t:
                t.pop()  # edits a copy: the next call sees the row unchanged
        return (2.0, 3.0)

    reward = RuleReward(None, reward_fn=picky, batch=True)
    for _ in range(2):
        assert [r for r, _ in reward.score(_rollouts(["a", "b"]), CONTEXTS)] == [2.0, 3.0]
    assert seen[1] == (["p0", "p1"], [[["1", "2"]], None], [1, 3], 5)
    assert CONTEXTS["p0"].extra["tests"] == [["1", "2"]]


def test_components_and_numpy_arrays_are_read_as_per_sample_returns_are():
    def parts(completions):
        return [{"correct": 1.0, "brevity": -0.5}, {"reward": 2.0, "logged": 9.0}]

    (r0, c0), (r1, c1) = RuleReward(None, reward_fn=parts, batch=True).score(_rollouts(["a", "b"]), CONTEXTS)
    assert (r0, c0) == (0.5, {"correct": 1.0, "brevity": -0.5, FAILED: 0.0})
    assert (r1, c1) == (2.0, {"reward": 2.0, "logged": 9.0, FAILED: 0.0})
    as_array = RuleReward(None, reward_fn=lambda completions: np.array([0.25, 1.0]), batch=True)
    assert [r for r, _ in as_array.score(_rollouts(["a", "b"]), CONTEXTS)] == [0.25, 1.0]


def test_a_none_item_fails_that_sample_alone():
    def partly(completions):
        return [None if c == "skip" else 1.0 for c in completions]

    reward = RuleReward(None, reward_fn=partly, batch=True, on_error="drop")
    out = reward.score(_rollouts(["ok", "skip", "ok"]), CONTEXTS)
    assert out == [(1.0, {FAILED: 0.0}), (0.0, {FAILED: 1.0}), (1.0, {FAILED: 0.0})]
    assert (reward.scored, reward.failed) == (3, 1)
    with pytest.raises(RewardFunctionError, match=r"partly.*prompt 'p1' \(sample s1\).*returned None"):
        RuleReward(None, reward_fn=partly, batch=True, on_error="fail").score(_rollouts(["ok", "skip"]), CONTEXTS)


@pytest.mark.parametrize(
    "value, why",
    [([1.0], "returned 1 rewards for 3 responses"), (1.0, "returned a float"), (np.ones((3, 1)), "ndarray")],
)
def test_a_wrong_length_or_shape_fails_every_sample_of_the_call(value, why):
    reward = RuleReward(None, reward_fn=lambda completions: value, batch=True)
    out = reward.score(_rollouts(["a", "b", "c"]), CONTEXTS)
    assert out == [(0.0, {FAILED: 1.0})] * 3 and (reward.scored, reward.failed) == (3, 3)
    with pytest.raises(RewardFunctionError, match=why):
        RuleReward(None, reward_fn=lambda completions: value, batch=True, on_error="fail").score(
            _rollouts(["a", "b", "c"]), CONTEXTS
        )


def test_a_raising_batch_function_names_itself_with_on_error_fail_and_breaks_after_its_samples():
    def broken_batch(completions, **kwargs):
        raise ZeroDivisionError("broken on purpose")

    with pytest.raises(RewardFunctionError, match=r"broken_batch failed on the batch call over 2 samples: Zero"):
        RuleReward(None, reward_fn=broken_batch, batch=True, on_error="fail").score(_rollouts(["a", "b"]), CONTEXTS)
    dropping = RuleReward(None, reward_fn=broken_batch, batch=True, on_error="drop", failure_window=10_000)
    # One failed call fails all its samples but counts once: a call larger than BROKEN_AFTER ends nothing.
    assert dropping.score(_rollouts(["x"] * (2 * BROKEN_AFTER)), CONTEXTS) == [(0.0, {FAILED: 1.0})] * 2 * BROKEN_AFTER
    for _ in range(BROKEN_AFTER - 2):
        dropping.score(_rollouts(["x"] * 8), CONTEXTS)
    with pytest.raises(RewardFunctionError, match=f"failed on {BROKEN_AFTER} samples in a row"):
        dropping.score(_rollouts(["x"] * 8), CONTEXTS)  # the BROKEN_AFTER-th failed call


def test_an_async_batch_function_is_awaited():
    async def judged(completions, answer):
        await asyncio.sleep(0)
        return [float(c == a) for c, a in zip(completions, answer)]

    reward = RuleReward(None, reward_fn=judged, batch=True, timeout_s=30.0)
    assert [r for r, _ in reward.score(_rollouts(["4", "0"]), CONTEXTS)] == [1.0, 0.0]


def test_the_timeout_bounds_the_one_call_and_fails_its_samples():
    release = threading.Event()

    def hangs(completions):
        release.wait(60)  # abandoned at the timeout; released when the test ends
        return [1.0] * len(completions)

    try:
        reward = RuleReward(None, reward_fn=hangs, batch=True, timeout_s=0.2)
        assert reward.score(_rollouts(["a", "b"]), CONTEXTS) == [(0.0, {FAILED: 1.0})] * 2
        assert (reward.scored, reward.failed, reward.timed_out) == (2, 2, 1)  # one call timed out
    finally:
        release.set()


USER_MODULE = """
def needs_solution(completions, solution, **kwargs):
    return [1.0] * len(completions)

def positional(completions, /):
    return [1.0] * len(completions)

calls = []

def counted(completions, answer):
    calls.append(len(completions))
    return [float(c == a) for c, a in zip(completions, answer)]
"""


@pytest.fixture
def user_module(user_module_of) -> str:
    return user_module_of(USER_MODULE, "batch_rewards")


def test_a_required_parameter_nothing_offers_is_refused_at_load(user_module, tmp_path):
    spec = f"{user_module}:needs_solution"
    offered = r"\['solution'\].*'completions', 'prompts', 'completion_ids', 'answer', 'source', 'prompt_id', .*'level'"
    with pytest.raises(ValueError, match=rf"scoring.rewards\[0\].function=.*needs_solution.*{offered}"):
        load_reward_fn(spec, "scoring.rewards[0].function", batch=True, columns=["level"])
    assert load_reward_fn(spec, batch=True, columns=["solution"]) is not None  # an extra column offers it
    with pytest.raises(ValueError, match=r"\['solution'\]"):
        RuleReward(None, reward_fn=spec, batch=True, columns=[])
    with pytest.raises(ValueError, match=r"by keyword only.*\['completions'\]"):
        load_reward_fn(f"{user_module}:positional", batch=True)

    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "2+2=", "answer": "4", "level": 1}\n')
    rewards = [{"type": "function", "function": spec, "batch": True}]
    cfg = {"data": {"path": str(data), "columns": {"extra": ["level"]}}, "scoring": {"rewards": rewards}}
    from rlhf_cluster.job.preflight import preflight

    with pytest.raises(ConfigError, match=r"scoring.rewards\[0\].function=.*\['solution'\]"):
        preflight(JobConfig.model_validate(cfg))


def test_batch_with_concurrency_is_refused_naming_the_fields():
    with pytest.raises(ValidationError, match=r"batch: true calls the function once per batch.*concurrency: 4"):
        FunctionReward(function="my_rewards:score", batch=True, concurrency=4)
    assert FunctionReward(function="my_rewards:score", batch=True).batch
    with pytest.raises(ValueError, match="concurrency=2 with batch"):
        RuleReward(None, reward_fn=lambda completions: [], batch=True, concurrency=2)


def test_a_reward_worker_built_from_the_config_calls_the_batch_function_once(user_module):
    """The RewardWorker's constructor passes `batch` on (its class, without Ray's actor around it)."""
    import importlib

    from actors.workers.scoring import RewardWorker
    from actors.workers.settings import ScoringSettings

    rewards = [{"type": "function", "function": f"{user_module}:counted", "batch": True, "weight": 2.0}]
    cfg = JobConfig.model_validate({"scoring": {"rewards": rewards}, "metrics": {"enabled": False}})
    worker = RewardWorker.__ray_metadata__.modified_class(ScoringSettings.of(cfg), None, 0)
    out = worker.score(_rollouts(["4", "0", "4"]), CONTEXTS)
    assert [r for r, _ in out] == [2.0, 0.0, 2.0] and importlib.import_module(user_module).calls == [3]
    assert worker.stats() == {"scored": 3, "failed": 0, "timed_out": 0}


def test_failed_calls_count_their_samples_toward_max_failure_fraction():
    """A batch function that fails every second call drops half the samples: above a 0.3
    max_failure_fraction it stops the job, as a per-sample function failing half its samples does."""
    calls = iter(range(10**6))

    def every_second(completions):
        if next(calls) % 2:
            raise RuntimeError("down")
        return [1.0] * len(completions)

    reward = RuleReward(
        None, reward_fn=every_second, batch=True, on_error="drop", max_failure_fraction=0.3, failure_window=32
    )
    with pytest.raises(RewardFunctionError, match=r"failed on \d+ of its last 32 samples"):
        for _ in range(20):
            reward.score(_rollouts(["x"] * 8), CONTEXTS)
