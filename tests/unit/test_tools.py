"""Tool calls, the calculator, and the tool environment's episodes (real sandboxed processes for
the Python tool)."""

from __future__ import annotations

import time

import pytest

from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.generation.environments import ToolEnvironment, load_environment
from rlhf_cluster.tools.calls import ToolCall, calculate, parse_tool_calls, run_tool
from rlhf_cluster.tools.sandbox import SandboxLimits


def test_calls_are_parsed_in_order_and_other_text_is_ignored():
    turn = "Let me compute. <calculator> 123 * 456 </calculator> then <python>print(2**10)</python> done <tool>x</tool>"
    assert parse_tool_calls(turn) == [ToolCall("calculator", "123 * 456"), ToolCall("python", "print(2**10)")]
    assert parse_tool_calls("no calls here") == []


@pytest.mark.parametrize("expr, expected", [("123456789 * 987654321", "121932631112635269"), ("(7 + 5) // 5", "2"),
                                            ("-3 ** 2", "-9"), ("10 / 4", "2.5"), ("2 ** 10 - 24", "1000"),
                                            ("(-8) ** 3.0", "-512"), ("(-2) ** -2", "0.25"), ("2 ** 0.5", "1.4142135623730951"),
                                            ("10 ** -400", "0")])
def test_calculator(expr, expected):
    assert calculate(expr) == expected


@pytest.mark.parametrize("expr, error", [("__import__('os').system('true')", "not arithmetic"), ("1 / 0", "division by zero"),
                                         ("10 ** 10 ** 9", "digits"), ("2 +", "cannot parse"),
                                         ("(" * 300 + "1" + ")" * 300, "cannot parse"), ("2**2**2**2**2**2", "digits"),
                                         ("9**9**9", "digits"), ("(10**999) * (10**999)", "digits"),
                                         ("0 ** -1", "division by zero"), ("True + 1j", "not arithmetic")])
def test_calculator_refuses_what_is_not_bounded_arithmetic(expr, error):
    result = run_tool(ToolCall("calculator", expr))
    assert result.error is not None and error in result.error
    assert result.observation().startswith('<error name="calculator">')


def test_an_episode_runs_tools_until_a_turn_without_calls():
    env = ToolEnvironment(max_turns=3, limits=SandboxLimits(wall_s=4, cpu_s=1))
    assert env.reset(Prompt("p0", "What is 123456 * 789?", "97406784")) == ""
    first = env.step("<calculator>123456 * 789</calculator>")
    assert (first.observation, first.done) == ('<result name="calculator">97406784</result>', False)
    second = env.step("<python>print(sum(range(5)))</python><python>while True: pass</python>")
    assert second.observation.startswith('<result name="python">10\n</result><error name="python">')
    assert second.info["tool_calls"] == 2 and second.info["tool_errors"] == 1 and not second.done
    assert env.step("The answer is 97406784").done


def test_an_episode_ends_at_max_turns():
    env = ToolEnvironment(max_turns=1)
    env.reset(Prompt("p0", "q", "a"))
    assert env.step("<calculator>1+1</calculator>").done


def test_environments_load_by_name_or_module_and_bad_names_say_why():
    assert load_environment("tools") is ToolEnvironment
    assert load_environment("rlhf_cluster.generation.environments:ToolEnvironment") is ToolEnvironment
    with pytest.raises(ValueError, match="generation.environment='nope' must look like 'module:Class'"):
        load_environment("nope")
    with pytest.raises(ValueError, match="expected a class with reset"):
        load_environment("rlhf_cluster.tools.calls:calculate")


# Issue 34: inputs that used to raise TypeError/MemoryError/RecursionError/OverflowError out of
# `run_tool` (and so out of the generation worker), or came back as `inf`/a complex number. Each is
# an error observation, in a bound, through the environment too.
HOSTILE_CALCULATIONS = [
    ("((-1)**0.5)**2", "not a real number"),  # complex results
    ("(-1)**0.5 // 1", "not a real number"),
    ("(-8) ** (1 / 3)", "not a real number"),
    ("-" * 7000 + "1", "at most 1000"),  # deep nesting: longer than any bounded expression
    ("-" * 500 + "1", "nested deeper than 100"),  # deep nesting the parser accepts
    ("2**" * 5000 + "2", "at most 1000"),  # exponent towers
    ("10**999 / 3", "out of range"),  # huge numbers
    ("2.0 ** 5000", "out of range"),
    ("1.5 ** (10 ** 900)", "out of range"),
    ("1e308 * 10", "not finite"),
    ("(-1) ** 0.5", "not a real number"),  # came back as "(6.123233995736766e-17+1j)"
]


@pytest.mark.parametrize("expr, error", HOSTILE_CALCULATIONS)
def test_hostile_calculations_are_error_observations_never_exceptions(expr, error):
    start = time.monotonic()
    result = run_tool(ToolCall("calculator", expr))
    assert result.error is not None and error in result.error, result
    assert result.observation().startswith('<error name="calculator">')
    env = ToolEnvironment(max_turns=2)
    env.reset(Prompt("p0", "q", "a"))
    step = env.step(f"<calculator>{expr}</calculator>")
    assert step.observation.startswith('<error name="calculator">') and step.info["tool_errors"] == 1
    assert time.monotonic() - start < 2.0


# The bound is on the result's size (checked before a power is computed), not on the exponent
# times the base's digits, which refused these.
@pytest.mark.parametrize("expr, expected", [("2 ** 3000 // 2 ** 2999", "2"), ("10 ** 999 // 10 ** 998", "10")])
def test_powers_within_the_size_bound_are_computed(expr, expected):
    assert calculate(expr) == expected


def test_a_tool_that_fails_in_an_unexpected_way_is_still_an_error_observation(monkeypatch):
    def broken(code, limits):
        raise OSError(28, "No space left on device")  # e.g. its temporary directory cannot be made

    monkeypatch.setattr("rlhf_cluster.tools.calls.run_python", broken)
    result = run_tool(ToolCall("python", "print(1)"))
    assert result.error == "python failed: OSError: [Errno 28] No space left on device"
    assert run_tool(ToolCall("calculator", None)).error.startswith("calculator failed: AttributeError")
