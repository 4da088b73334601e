"""Tool calls in a model's turn and their results.

Default format, one tagged block per call (several per turn are run in order):

    <calculator>123456 * 789</calculator>
    <python>print(sum(range(10)))</python>

A result comes back as `<result name="calculator">97406784</result>` (or `<error ...>`), which
the environment appends as an observation. A user's own format: a `module:function` taking the
turn's text and returning `ToolCall`s (`parser` of `ToolEnvironment`).
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass
from typing import Callable

from rlhf_cluster.tools.sandbox import SandboxLimits, run_python

CALL = re.compile(r"<(calculator|python)>(.*?)</\1>", re.DOTALL)
MAX_RESULT_CHARS = 2000  # what an observation may carry back into the context


@dataclass(frozen=True)
class ToolCall:
    """One call: the tool's name and its argument text."""

    name: str
    text: str


@dataclass(frozen=True)
class ToolResult:
    """A tool's answer; `error` names what went wrong (the model reads it, the job goes on)."""

    name: str
    output: str
    error: str | None = None

    def observation(self) -> str:
        if self.error is not None:
            return f'<error name="{self.name}">{self.error[:MAX_RESULT_CHARS]}</error>'
        return f'<result name="{self.name}">{self.output[:MAX_RESULT_CHARS]}</result>'


def parse_tool_calls(turn: str) -> list[ToolCall]:
    """The default format's calls in a model turn, in order."""
    return [ToolCall(m.group(1), m.group(2).strip()) for m in CALL.finditer(turn)]


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_DIGITS = 1000  # a result longer than this is refused (10 ** 10 ** 9 must not take the worker down)


def calculate(expression: str) -> str:
    """Evaluate integer/decimal arithmetic (+ - * / // % ** and parentheses) without `eval`."""

    def value(node: ast.AST):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) * len(str(abs(int(left)) or 1)) > MAX_DIGITS:
                raise ValueError(f"result would exceed {MAX_DIGITS} digits")
            out = _OPS[type(node.op)](left, right)
            if isinstance(out, int) and out.bit_length() > MAX_DIGITS * 3.33:
                raise ValueError(f"result exceeds {MAX_DIGITS} digits")
            return out
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {ast.unparse(node)!r}")

    try:
        tree = ast.parse(expression.strip(), mode="eval")
        result = value(tree.body)
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    except SyntaxError:
        raise ValueError(f"cannot parse {expression.strip()!r}") from None
    if isinstance(result, float) and result.is_integer():
        result = int(result)
    return str(result)


def run_tool(call: ToolCall, limits: SandboxLimits = SandboxLimits()) -> ToolResult:
    """Run one call; every failure is a `ToolResult` with an error, never an exception."""
    if call.name == "calculator":
        try:
            return ToolResult(call.name, calculate(call.text))
        except (ValueError, OverflowError, RecursionError) as exc:
            return ToolResult(call.name, "", str(exc))
    if call.name == "python":
        result = run_python(call.text, limits)
        return ToolResult(call.name, result.stdout, None if result.ok else result.error)
    return ToolResult(call.name, "", f"unknown tool {call.name!r} (known: calculator, python)")


ToolParser = Callable[[str], list[ToolCall]]
