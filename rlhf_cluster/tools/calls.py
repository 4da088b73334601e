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
import logging
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

from rlhf_cluster.tools.sandbox import SandboxLimits, run_python

log = logging.getLogger(__name__)

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


_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[int | float], int | float]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
# Bounds that keep one call small whatever the policy writes: the parser recurses per nesting
# level (7,000 nested signs exhaust it), and an integer's size grows with every `**`.
MAX_DIGITS = 1000  # a result longer than this is refused (10 ** 10 ** 9 must not take the worker down)
MAX_BITS = int(MAX_DIGITS * 3.33)  # the same bound on an integer's bit length
MAX_EXPRESSION_CHARS = 1000
MAX_DEPTH = 100  # nested operators and parentheses


def calculate(expression: str) -> str:
    """Evaluate real arithmetic (+ - * / // % ** and parentheses on int/float literals) without
    `eval`. Raises ValueError naming the problem for anything else: not arithmetic, a complex or
    non-finite result, an integer over MAX_DIGITS digits, nesting deeper than MAX_DEPTH, or an
    expression over MAX_EXPRESSION_CHARS characters."""
    text = expression.strip()
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression of {len(text)} characters; at most {MAX_EXPRESSION_CHARS}")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot parse {text!r}") from None
    except (RecursionError, MemoryError):  # the parser's own stack: nesting far too deep
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels") from None
    try:
        result = _value(tree.body, 0)
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    except OverflowError:  # float arithmetic out of range, or an integer too large for a float
        raise ValueError("result out of range") from None
    if isinstance(result, float) and result.is_integer():
        result = int(result)
    return str(result)


def _value(node: ast.AST, depth: int) -> int | float:
    """A node's value: only finite reals, integers of at most MAX_BITS bits, depth at most MAX_DEPTH."""
    if depth > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _value(node.left, depth + 1), _value(node.right, depth + 1)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        return _bounded(_OPS[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand, depth + 1))
    raise ValueError(f"not arithmetic: {_source(node)!r}")


def _check_power(base: int | float, exponent: int | float) -> None:
    """Refuse a power before computing it when its result would be complex or too large."""
    if base < 0 and not float(exponent).is_integer():
        raise ValueError(f"({base}) ** {exponent} is not a real number")
    if base == 0 and exponent < 0:
        raise ZeroDivisionError
    if isinstance(base, int) and isinstance(exponent, int) and abs(base) > 1 and exponent > 0:
        # bits of |base| ** exponent, within one per factor: refused before the work is done
        if (abs(base).bit_length() - 1) * exponent > MAX_BITS:
            raise ValueError(f"result would exceed {MAX_DIGITS} digits")


def _bounded(value: object) -> int | float:
    """`value` if it is a finite real of bounded size (`complex` never passes: only reals are answers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"result is not a real number: {value!r}"[:200])
    if isinstance(value, int) and value.bit_length() > MAX_BITS:
        raise ValueError(f"result exceeds {MAX_DIGITS} digits")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"result is not finite ({value})")
    return value


def _source(node: ast.AST) -> str:
    try:
        return ast.unparse(node)[:100]
    except (RecursionError, ValueError):
        return type(node).__name__


def run_tool(call: ToolCall, limits: SandboxLimits = SandboxLimits()) -> ToolResult:
    """Run one call; every failure is a `ToolResult` with an error, never an exception."""
    name = getattr(call, "name", "tool")
    try:
        return _run(call, limits)
    except Exception as exc:  # noqa: BLE001 - the promise to the environment: the model reads it, the job goes on
        log.warning("tool %r failed unexpectedly", name, exc_info=True)
        return ToolResult(str(name), "", f"{name} failed: {type(exc).__name__}: {exc}")


def _run(call: ToolCall, limits: SandboxLimits) -> ToolResult:
    if call.name == "calculator":
        try:
            return ToolResult(call.name, calculate(call.text))
        except ValueError as exc:
            return ToolResult(call.name, "", str(exc))
    if call.name == "python":
        result = run_python(call.text, limits)
        return ToolResult(call.name, result.stdout, None if result.ok else result.error)
    return ToolResult(call.name, "", f"unknown tool {call.name!r} (known: calculator, python)")


ToolParser = Callable[[str], list[ToolCall]]
