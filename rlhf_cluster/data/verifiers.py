"""Built-in verifiers: a response checked against a prompt's reference answer.

Each verifier returns reward components (`correct` is 1.0 or 0.0; the reward is the weighted sum
of REWARD_WEIGHTS[name]). `data.verifier` names one; a custom `module:function` reward source is
the way to anything else.

- `arithmetic`: the built-in task (the response is exactly the sum), plus a dense `digits` term.
- `tool_arithmetic`: the built-in tool task: the episode's final turn (after the last tool result)
  is exactly the sum; `tool_calls` counts calculator calls (weight 0, a diagnostic).
- `visual_count` / `visual_color`: the built-in visual tasks: the response is exactly the count
  (plus `digits`, as `arithmetic`) / the colour's name, case aside (plus `known`: it names one of
  the task's colours).
- `gsm8k`: the reference is what follows `####` (GSM8K's answer column); the response's answer is
  what follows its last `####`, else its last number. Commas, `$`, `%` and a trailing `.` are
  ignored and numbers compare by value (`1,000.00` equals `1000`).
- `boxed`: the last `\\boxed{...}` (or `\\fbox{...}`) of the response, nested braces included,
  against the reference's own `\\boxed{...}` or the whole reference; both normalised (spaces,
  `\\left`/`\\right`, `\\dfrac`/`\\tfrac`, `\\text{}`, `$`, a leading `x =`), numbers by value.
- `exact`: the stripped response equals the stripped reference.
- `regex`: `data.verifier_pattern` searched in the response; its last match (group 1 if the
  pattern has a group) stripped equals the stripped reference.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from fractions import Fraction

from rlhf_cluster.data.tasks import verify_arithmetic
from rlhf_cluster.data.tool_task import verify_tool_arithmetic
from rlhf_cluster.data.visual_task import verify_color, verify_count

Verifier = Callable[[str, str], dict[str, float]]

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")


def _number(text: str) -> Fraction | None:
    """`text` as an exact number (`$`, `%`, commas and a trailing `.` ignored), or None."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".").rstrip("%").strip()
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def _same(a: str, b: str) -> bool:
    """Equal as numbers when both are numbers, else as strings."""
    x, y = _number(a), _number(b)
    if x is not None and y is not None:
        return x == y
    return a == b


def gsm8k_reference(answer: str) -> str:
    """GSM8K's final answer: the text after the last `####` (the whole answer if there is none)."""
    return answer.rsplit("####", 1)[-1].strip()


def gsm8k_response(response: str) -> str | None:
    """The answer a response gives: the first number after its last `####`, else its last number."""
    if "####" in response:
        found = _NUMBER.search(response.rsplit("####", 1)[-1])
        return found.group(0) if found else None
    numbers = _NUMBER.findall(response)
    return numbers[-1] if numbers else None


def verify_gsm8k(response: str, answer: str) -> dict[str, float]:
    given = gsm8k_response(response)
    return {"correct": float(given is not None and _same(given, gsm8k_reference(answer)))}


def last_boxed(text: str) -> str | None:
    """The contents of the last `\\boxed{...}` or `\\fbox{...}` in `text` (nested braces kept), or None."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None  # unbalanced: the response was cut off inside the box


def normalize_math(text: str) -> str:
    """A math answer in one canonical spelling: no spaces, `$`, `\\left`/`\\right`, `\\!`, `\\,`;
    `\\dfrac`/`\\tfrac` as `\\frac`; `\\text{x}` as `x`; no leading `x=` or trailing `.`."""
    s = text.strip()
    s = re.sub(r"\\text\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:mathrm|textbf|mathbf)\s*\{([^{}]*)\}", r"\1", s)
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\ ", "$"):
        s = s.replace(token, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"^[a-zA-Z]=", "", s)
    return s.rstrip(".")


def verify_boxed(response: str, answer: str) -> dict[str, float]:
    given = last_boxed(response)
    if given is None:
        return {"correct": 0.0}
    reference = last_boxed(answer)
    a, b = normalize_math(given), normalize_math(answer if reference is None else reference)
    return {"correct": float(_same(a, b))}


def verify_exact(response: str, answer: str) -> dict[str, float]:
    return {"correct": float(response.strip() == answer.strip())}


def regex_verifier(pattern: str) -> Verifier:
    """A verifier that extracts the answer with `pattern` (its last match; group 1 if it has a group)."""
    compiled = re.compile(pattern)

    def verify_regex(response: str, answer: str) -> dict[str, float]:
        matches = list(compiled.finditer(response))
        if not matches:
            return {"correct": 0.0}
        last = matches[-1]
        given = last.group(1) if compiled.groups else last.group(0)
        return {"correct": float(given is not None and given.strip() == answer.strip())}

    return verify_regex


VERIFIERS: dict[str, Verifier] = {
    "arithmetic": verify_arithmetic,
    "tool_arithmetic": verify_tool_arithmetic,
    "visual_count": verify_count,
    "visual_color": verify_color,
    "gsm8k": verify_gsm8k,
    "boxed": verify_boxed,
    "exact": verify_exact,
}
VERIFIER_NAMES = (*VERIFIERS, "regex")
REWARD_WEIGHTS: dict[str, dict[str, float]] = {
    "arithmetic": {"correct": 1.0, "digits": 0.2},
    "tool_arithmetic": {"correct": 1.0},
    "visual_count": {"correct": 1.0, "digits": 0.2},
    # `known` (any colour named) is recorded, not rewarded: at 0.2 it drew RL onto one colour (the
    # surest way to name one) before the image was read (vlm demo: entropy 0.02, held-out at chance).
    "visual_color": {"correct": 1.0, "known": 0.0},
}


def build_verifier(name: str, pattern: str | None = None) -> tuple[Verifier, dict[str, float]]:
    """The verifier `name` (`regex` needs `pattern`) and the weights that make its reward."""
    if name == "regex":
        if not pattern:
            raise ValueError("data.verifier_pattern: the regex verifier needs a pattern (e.g. 'answer: (\\S+)')")
        return regex_verifier(pattern), {"correct": 1.0}
    if name not in VERIFIERS:
        raise ValueError(f"data.verifier: unknown verifier {name!r}; known: {list(VERIFIER_NAMES)}")
    return VERIFIERS[name], REWARD_WEIGHTS.get(name, {"correct": 1.0})
