"""Tool calls, the calculator, and the tool environment's episodes (real sandboxed processes for
the Python tool)."""

from __future__ import annotations

import pytest

from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.environments import ToolEnvironment, load_environment
from rlhf_cluster.tools.calls import ToolCall, calculate, parse_tool_calls, run_tool
from rlhf_cluster.tools.sandbox import SandboxLimits


def test_calls_are_parsed_in_order_and_other_text_is_ignored():
    turn = "Let me compute. <calculator> 123 * 456 </calculator> then <python>print(2**10)</python> done <tool>x</tool>"
    assert parse_tool_calls(turn) == [ToolCall("calculator", "123 * 456"), ToolCall("python", "print(2**10)")]
    assert parse_tool_calls("no calls here") == []


@pytest.mark.parametrize("expr, expected", [("123456789 * 987654321", "121932631112635269"), ("(7 + 5) // 5", "2"),
                                            ("-3 ** 2", "-9"), ("10 / 4", "2.5"), ("2 ** 10 - 24", "1000")])
def test_calculator(expr, expected):
    assert calculate(expr) == expected


@pytest.mark.parametrize("expr, error", [("__import__('os').system('true')", "not arithmetic"), ("1 / 0", "division by zero"),
                                         ("10 ** 10 ** 9", "digits"), ("2 +", "cannot parse")])
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
    assert load_environment("rlhf_cluster.environments:ToolEnvironment") is ToolEnvironment
    with pytest.raises(ValueError, match="generation.environment='nope' must look like 'module:Class'"):
        load_environment("nope")
    with pytest.raises(ValueError, match="expected a class with reset"):
        load_environment("rlhf_cluster.tools.calls:calculate")
