"""Rule-based rewards: the built-in verifier, custom `module:function` rewards and their failures."""

from __future__ import annotations

import math

import pytest

from rlhf_cluster.config import ConfigError, FunctionReward, load_config
from rlhf_cluster.data.tasks import combine_reward, verify_arithmetic
from rlhf_cluster.data.verifiers import REWARD_WEIGHTS
from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.scoring.rewards import BROKEN_AFTER, FAILED, RewardFunctionError, RuleReward, load_reward_fn

USER_MODULE = '''
import math

def exact(response, answer):
    return 1.0 if response.strip() == answer else 0.0

def parts(response, answer):
    return {"correct": float(response.strip() == answer), "brevity": -0.1 * len(response)}

def with_total(response, answer):
    return {"reward": 2.0, "logged_only": 100.0}

def integer(response, answer):
    return 3

def flaky(response, answer):
    if response == "raise":
        raise RuntimeError("cannot parse " + response)
    if response == "nan":
        return math.nan
    if response == "inf":
        return {"a": math.inf}
    if response == "str":
        return "1.0"
    if response == "none":
        return None
    if response == "empty":
        return {}
    if response == "badkey":
        return {1: 1.0}
    return 0.5

def slow(response, answer):
    import time
    if response == "hang":
        time.sleep(30)
    return 1.0

def always_raises(response, answer):
    raise ZeroDivisionError("broken on purpose")

def one_arg(response):
    return 1.0

class Scorer:
    @staticmethod
    def score(response, answer):
        return 0.25

not_callable = 3
'''


@pytest.fixture
def user_module(user_module_of) -> str:
    """A reward module written to tmp_path and put on sys.path; a fresh name per test."""
    return user_module_of(USER_MODULE, "user_rewards")


def _rollouts(texts: list[str], prompt_id: str = "p0") -> list[Rollout]:
    return [
        Rollout(f"s{i}", prompt_id, "g0", [1, 2], [3], [-0.5], 0, "stop", response_text=t) for i, t in enumerate(texts)
    ]


ANSWERS = {"p0": "19"}


def test_builtin_verifier_unchanged():
    reward = RuleReward("arithmetic")
    texts = ["19", "18", "ab"]
    out = reward.score(_rollouts(texts), ANSWERS)
    for (r, comps), text in zip(out, texts):
        expected = verify_arithmetic(text, "19")
        assert comps == expected  # no reward_failed key on the built-in path
        assert r == combine_reward(expected, REWARD_WEIGHTS["arithmetic"])
    assert (reward.scored, reward.failed) == (3, 0)


def test_missing_answer_is_an_error():
    with pytest.raises(KeyError, match="p9"):
        RuleReward("arithmetic").score(_rollouts(["1"], prompt_id="p9"), ANSWERS)


def test_float_reward_fn(user_module):
    reward = RuleReward(None, reward_fn=f"{user_module}:exact")
    out = reward.score(_rollouts(["19", " 19\n", "7"]), ANSWERS)
    assert [r for r, _ in out] == [1.0, 1.0, 0.0]
    assert all(c == {"reward_failed": 0.0} for _, c in out)
    assert (reward.scored, reward.failed) == (3, 0)


def test_dict_reward_fn_sums_components(user_module):
    (r, comps), = RuleReward("arithmetic", reward_fn=f"{user_module}:parts").score(_rollouts(["19"]), ANSWERS)
    assert comps == {"correct": 1.0, "brevity": pytest.approx(-0.2), "reward_failed": 0.0}
    assert r == pytest.approx(0.8)  # the custom function wins over the task's verifier


def test_dict_reward_key_is_the_reward(user_module):
    (r, comps), = RuleReward(None, reward_fn=f"{user_module}:with_total").score(_rollouts(["x"]), ANSWERS)
    assert r == 2.0
    assert comps["logged_only"] == 100.0


@pytest.mark.parametrize("spec,expected", [("integer", 3.0), ("Scorer.score", 0.25)])
def test_other_callables(user_module, spec, expected):
    # An int return becomes a float; a dotted path reaches a static method of a class.
    (r, comps), = RuleReward(None, reward_fn=f"{user_module}:{spec}").score(_rollouts(["x"]), ANSWERS)
    assert type(r) is float and r == expected
    assert comps == {"reward_failed": 0.0}


def test_callable_object_accepted():
    reward = RuleReward(None, reward_fn=lambda response, answer: len(response))
    assert reward.score(_rollouts(["abc"]), ANSWERS)[0][0] == 3.0


def test_bad_samples_are_marked_and_counted(user_module):
    bad = ["raise", "nan", "inf", "str", "none", "empty", "badkey"]
    reward = RuleReward(None, reward_fn=f"{user_module}:flaky")
    out = reward.score(_rollouts(["ok"] + bad), ANSWERS)
    assert out[0] == (0.5, {"reward_failed": 0.0})
    for (r, comps), text in zip(out[1:], bad):
        assert r == 0.0 and comps == {"reward_failed": 1.0}, text
        assert math.isfinite(r)
    assert (reward.scored, reward.failed) == (8, 7)
    # The counters accumulate over calls; the job went on.
    reward.score(_rollouts(["ok", "raise"]), ANSWERS)
    assert (reward.scored, reward.failed) == (10, 8)


def test_on_error_fail_ends_at_the_first_failure_naming_function_prompt_and_cause(user_module):
    reward = RuleReward(None, reward_fn=f"{user_module}:flaky", on_error="fail")
    assert reward.score(_rollouts(["ok", "ok"]), ANSWERS) == [(0.5, {"reward_failed": 0.0})] * 2
    with pytest.raises(RewardFunctionError) as info:
        reward.score(_rollouts(["ok", "nan", "ok"], prompt_id="p7"), {"p7": "1"})
    msg = str(info.value)
    assert f"{user_module}:flaky" in msg and "prompt 'p7'" in msg and "sample s1" in msg and "nan" in msg
    assert (reward.scored, reward.failed) == (4, 1)


def test_a_call_past_its_timeout_fails_without_stalling_the_worker(user_module):
    import time

    reward = RuleReward(None, reward_fn=f"{user_module}:slow", timeout_s=0.3)
    begun = time.perf_counter()
    out = reward.score(_rollouts(["fast", "hang", "fast"]), ANSWERS)
    assert time.perf_counter() - begun < 5  # the hung call was abandoned after 0.3 s, not waited out
    assert [r for r, _ in out] == [1.0, 0.0, 1.0]
    assert out[1][1] == {"reward_failed": 1.0}
    assert (reward.failed, reward.timed_out) == (1, 1)
    with pytest.raises(RewardFunctionError, match="TimeoutError: did not return within 0.3 s"):
        RuleReward(None, reward_fn=f"{user_module}:slow", timeout_s=0.3, on_error="fail").score(_rollouts(["hang"]), ANSWERS)


def test_a_broken_function_ends_the_job_even_with_drop(user_module):
    # Failures in a row over calls, not per call: one prompt's group failing whole is a bad prompt.
    reward = RuleReward(None, reward_fn=f"{user_module}:always_raises")
    for _ in range((BROKEN_AFTER - 1) // 4):
        assert reward.score(_rollouts(["a"] * 4), ANSWERS) == [(0.0, {"reward_failed": 1.0})] * 4
    with pytest.raises(RewardFunctionError) as info:
        reward.score(_rollouts(["a"] * 4), ANSWERS)
    msg = str(info.value)
    assert f"{user_module}:always_raises" in msg and f"{BROKEN_AFTER} samples in a row" in msg
    assert "ZeroDivisionError: broken on purpose" in msg and "prompt 'p0'" in msg
    assert reward.failed == BROKEN_AFTER


def test_a_success_resets_the_failure_streak(user_module):
    reward = RuleReward(None, reward_fn=f"{user_module}:flaky")
    for _ in range(3):
        reward.score(_rollouts(["raise"] * (BROKEN_AFTER - 1) + ["ok"]), ANSWERS)
    assert reward.failed == 3 * (BROKEN_AFTER - 1)


def test_empty_batch_is_not_a_failure(user_module):
    assert RuleReward(None, reward_fn=f"{user_module}:always_raises").score([], ANSWERS) == []


@pytest.mark.parametrize(
    "attr,expected",
    [
        ("missing", "has no attribute 'missing'"),
        ("not_callable", "not a function"),
        ("one_arg", "must accept (response: str, answer: str)"),
    ],
)
def test_bad_function_spec_is_named(user_module, attr, expected):
    with pytest.raises(ValueError) as info:
        load_reward_fn(f"{user_module}:{attr}")
    assert "scoring.rewards[].function" in str(info.value)
    assert expected in str(info.value)


def test_missing_module_is_named():
    with pytest.raises(ValueError) as info:
        RuleReward(None, reward_fn="no_such_module_xyz.sub:fn")
    msg = str(info.value)
    assert "scoring.rewards[].function" in msg and "'no_such_module_xyz.sub' not found" in msg


def test_broken_module_import_is_named(tmp_path, monkeypatch):
    (tmp_path / "broken_rewards_dep.py").write_text("import not_installed_dependency_xyz\n")
    (tmp_path / "broken_rewards_syntax.py").write_text("def f(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="importing module 'broken_rewards_dep' failed: ModuleNotFoundError"):
        load_reward_fn("broken_rewards_dep:f")
    with pytest.raises(ValueError, match="importing module 'broken_rewards_syntax' failed: SyntaxError"):
        load_reward_fn("broken_rewards_syntax:f")


@pytest.mark.parametrize("spec", ["nocolon", "mod:", ":fn", "mod:fn()", "a b:c", "mod:fn:extra", "1mod:fn"])
def test_reward_fn_syntax_checked_in_config(spec):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"data.reward_fn={spec!r}"])
    assert "data.reward_fn" in str(info.value) and "module:function" in str(info.value)
    with pytest.raises(ValueError, match="module:function"):
        load_reward_fn(spec)


def test_valid_reward_fn_in_config():
    cfg = load_config(None, ["data.reward_fn=pkg.mod:Cls.fn", "data.task=null", "data.path=p.jsonl"])
    rule = cfg.scoring.rule_source
    assert isinstance(rule, FunctionReward) and rule.function == "pkg.mod:Cls.fn"


def test_no_reward_at_all_is_named():
    with pytest.raises(ValueError, match=r"data\.verifier.*data\.task.*function"):
        RuleReward(None)
    with pytest.raises(ValueError, match="data.verifier: unknown verifier"):
        RuleReward("poetry")


def test_combine_rewards_weights_rule_and_reward_model_ensemble():
    from rlhf_cluster.scoring.rewards import combine_rewards

    rule = [(1.0, {"correct": 1.0}), (0.2, {"correct": 0.0})]
    models = {"a": [0.5, -1.0], "b": [1.5, 0.0]}
    mean = combine_rewards(rule, models, rule_weight=1.0, model_weight=0.5, combine="mean")
    assert mean[0] == (1.0 + 0.5 * 1.0, {"correct": 1.0, "rule": 1.0, "rm/a": 0.5, "rm/b": 1.5, "rm": 1.0})
    assert mean[1][0] == 0.2 + 0.5 * -0.5
    low = combine_rewards(rule, models, rule_weight=0.0, model_weight=1.0, combine="min")
    assert [r for r, _ in low] == [0.5, -1.0] and low[1][1]["rm"] == -1.0
    assert low[1][1]["correct"] == 0.0, "the verifier's components are kept even with rule_weight 0"
    assert combine_rewards(rule, {}) == [(1.0, {"correct": 1.0, "rule": 1.0}), (0.2, {"correct": 0.0, "rule": 0.2})]
    with pytest.raises(ValueError, match="combine"):
        combine_rewards(rule, models, combine="max")


def _one_in_three():
    """The issue's function: NaN on every 5th call, inf on every 7th (31% of calls fail, never 32 in a row)."""
    calls = iter(range(1, 10 ** 9))

    def score(response: str, answer: str) -> float:
        n = next(calls)
        return math.nan if n % 5 == 0 else math.inf if n % 7 == 0 else 1.0

    return score


def test_a_function_failing_on_a_third_of_its_calls_stops_the_job_above_max_failure_fraction():
    reward = RuleReward(None, reward_fn=_one_in_three(), max_failure_fraction=0.25, failure_window=100)
    with pytest.raises(RewardFunctionError) as info:
        for _ in range(50):  # 400 samples: the window is full after 100
            reward.score(_rollouts(["a"] * 8), ANSWERS)
    msg = str(info.value)
    assert "_one_in_three.<locals>.score (scoring.rewards)" in msg
    assert "of its last 100 samples" in msg and "more than max_failure_fraction 0.25" in msg
    rate = int(msg.split("failed on ")[1].split(" of its")[0])
    assert 25 < rate < 40 and f"({rate}%" in msg
    assert "the last: prompt 'p0'" in msg and ("is nan" in msg or "is inf" in msg)
    assert reward.scored <= 110  # stopped as soon as the window was full, not long after


def test_a_function_failing_below_max_failure_fraction_keeps_scoring(caplog):
    reward = RuleReward(None, reward_fn=_one_in_three(), failure_window=100)  # the default bound, 0.5
    with caplog.at_level("WARNING", logger="rlhf_cluster.scoring.rewards"):
        for _ in range(100):
            out = reward.score(_rollouts(["a"] * 8), ANSWERS)
    assert reward.scored == 800 and 0.28 < reward.failed / 800 < 0.34
    assert sum(c[1]["reward_failed"] for c in out) == sum(1 for r, c in out if r == 0.0)
    # Past half the bound (25%): an early warning naming the function and the rate, logged once.
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "(stops the job above 50%)" in warnings[0] and "_one_in_three" in warnings[0]


@pytest.mark.parametrize("fraction, window", [(1.5, 10), (-0.1, 10), (0.5, 0)])
def test_failure_bound_settings_are_checked(fraction, window):
    with pytest.raises(ValueError, match="max_failure_fraction|failure_window"):
        RuleReward(None, reward_fn=lambda r, a: 1.0, max_failure_fraction=fraction, failure_window=window)


def test_a_reward_function_written_for_verl_is_called_as_verl_calls_it():
    """verl's per-sample `compute_score(data_source, solution_str, ground_truth, extra_info)`, by
    keyword; its dict's `score` is the reward, its other numbers components, its strings left out."""
    seen = []

    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        seen.append((data_source, solution_str, ground_truth, extra_info))
        right = solution_str.strip().endswith(ground_truth)
        return {"score": 1.0 if right else -1.0, "acc": right, "pred": solution_str[-2:]}

    from rlhf_cluster.scoring.rewards import RewardContext

    contexts = {"p": RewardContext("72", "q", "openai/gsm8k", {"extra_info": {"index": 7, "split": "train"}})}
    rollouts = [
        Rollout(f"s{i}", "p", "g", [1], [2], [0.0], 0, "stop", text) for i, text in enumerate(["#### 72", "#### 7"])
    ]
    out = RuleReward(None, reward_fn=compute_score).score(rollouts, contexts)
    assert out == [(1.0, {"reward": 1.0, "acc": 1.0, FAILED: 0.0}), (-1.0, {"reward": -1.0, "acc": 0.0, FAILED: 0.0})]
    assert seen[0] == ("openai/gsm8k", "#### 72", "72", {"index": 7, "split": "train"})

    def scalar(solution_str, ground_truth, **kwargs):  # **kwargs: all four
        assert set(kwargs) == {"data_source", "extra_info"}
        return float(solution_str.endswith(ground_truth))

    assert [r for r, _ in RuleReward(None, reward_fn=scalar).score(rollouts, contexts)] == [1.0, 0.0]
    broken = RuleReward(None, reward_fn=lambda solution_str, ground_truth: {"acc": 1.0}, on_error="drop")
    assert broken.score(rollouts[:1], contexts)[0][1][FAILED] == 1.0  # no `score`: the sample's reward failed


def test_a_verl_function_is_checked_at_load_and_its_dicts_read_whole(user_module):
    import numpy as np

    from rlhf_cluster.scoring.verl_rewards import verl_keywords, verl_value

    def positional(solution_str, ground_truth, /):
        return 0.0

    def needs_more(data_source, solution_str, ground_truth, tokenizer):
        return 0.0

    def with_prompt(solution_str, ground_truth, prompt=""):
        return float(prompt == "q")

    with pytest.raises(ValueError, match=r"where: a function written for verl is called by keyword"):
        verl_keywords(positional, "where")
    with pytest.raises(ValueError, match=r"it requires \['tokenizer'\]"):
        verl_keywords(needs_more, "where")
    assert verl_keywords(with_prompt, "where") == ("solution_str", "ground_truth", "prompt")
    from rlhf_cluster.scoring.rewards import RewardContext

    contexts = {"p": RewardContext("1", "q", None, {})}
    rollout = Rollout("s", "p", "g", [1], [2], [0.0], 0, "stop", "1")
    assert RuleReward(None, reward_fn=with_prompt).score([rollout], contexts)[0][0] == 1.0  # ours passed too
    read = verl_value({"score": 0.5, "reward": 3.0, "ok": np.bool_(True), "bad": float("nan"), "pred": "1"})
    assert read == {"reward": 0.5, "verl_reward": 3.0, "ok": 1.0}


def test_a_verl_function_with_kwargs_gets_the_names_its_load_check_bound():
    from rlhf_cluster.scoring.rewards import RewardContext
    from rlhf_cluster.scoring.verl_rewards import VERL_NAMES, verl_keywords

    def with_prompt(solution_str, ground_truth, prompt, **kwargs):  # `prompt` required, the rest by **kwargs
        assert set(kwargs) == {"data_source", "extra_info"}
        return float(prompt == "q")

    assert verl_keywords(with_prompt, "where") == (*VERL_NAMES, "prompt")
    rollout = Rollout("s", "p", "g", [1], [2], [0.0], 0, "stop", "1")
    out = RuleReward(None, reward_fn=with_prompt).score([rollout], {"p": RewardContext("1", "q", None, {})})
    assert out[0][0] == 1.0
