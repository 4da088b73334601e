"""The built-in multi-turn task, `tool_arithmetic`: sums of numbers too large for the tiny model to
add reliably, where calling the calculator and copying its result is the way to be right.

The prompts are the arithmetic task's (`a+b=`, operands up to `data.max_operand`, the same
held-out split). An episode that uses the tool reads, token for token:

    123+456=<calculator>123+456</calculator><result name="calculator">579</result>579<eos>
            '-------- model turn 1 ---------''------- observation (masked) ------''turn 2'

and one that does not is just `579<eos>`. The verifier judges the final turn only (the text after
the last tool result), so copying a result is right and writing a result tag yourself earns
nothing. The supervised warm-up shows both kinds of episode (`TOOL_DEMO_SHARE` use the tool), so
RL starts from a policy that sometimes calls the calculator and sometimes guesses; reward alone
has to teach it which pays.
"""

from __future__ import annotations

import random

from rlhf_cluster.data.prompts import Prompt, Segment
from rlhf_cluster.data.tasks import arithmetic_rows
from rlhf_cluster.tools.calls import ToolCall, run_tool

TOOL_DEMO_SHARE = 0.5  # share of warm-up demonstrations that call the calculator


def tool_call_text(expression: str) -> str:
    """A model turn calling the calculator, in the default tool-call format."""
    return f"<calculator>{expression}</calculator>"


def calculator_observation(expression: str) -> str:
    """What the tool environment appends after a calculator call: the same function it runs."""
    return run_tool(ToolCall("calculator", expression)).observation()


def tool_demonstration(prompt: Prompt, use_tool: bool) -> list[Segment]:
    """One demonstration of `prompt` (`a+b=`): call the calculator, read the result (not trained
    on: the environment writes it), copy it; or answer at once. EOS follows the last segment."""
    if not use_tool:
        return [(prompt.answer, True)]
    expression = prompt.text.rstrip("=")
    return [(tool_call_text(expression), True), (calculator_observation(expression), False), (prompt.answer, True)]


def tool_demonstrations(prompts: list[Prompt], seed: int, tool_share: float = TOOL_DEMO_SHARE) -> list[list[Segment]]:
    """A demonstration per prompt, `tool_share` of them (seeded) using the calculator."""
    rng = random.Random(f"{seed}-tool-demos")
    return [tool_demonstration(p, rng.random() < tool_share) for p in prompts]


def final_turn(response: str) -> str:
    """The text after the last tool result or error in an episode's response (all of it if none)."""
    for closing in ("</result>", "</error>"):
        response = response.rsplit(closing, 1)[-1]
    return response


def verify_tool_arithmetic(response: str, answer: str) -> dict[str, float]:
    """`correct`: the final turn is exactly the sum; `tool_calls`: calculator calls in the episode
    (a diagnostic, weight 0: only being right is rewarded)."""
    text = final_turn(response).strip()
    return {
        "correct": float(text == answer and text.lstrip("-").isdigit()),
        "tool_calls": float(response.count("<calculator>")),
    }


def tool_arithmetic_corpus(num: int = 4000, seed: int = 1234, max_operand: int = 999) -> list[str]:
    """Text the tool task's tokenizer is trained on: episodes of both kinds, so the tool-call and
    result tags become a few tokens each instead of one per character. Each piece is its own text:
    an episode tokenizes its prompt, turns and observations apart, so no merge may cross them."""
    texts = []
    for r in arithmetic_rows(num, seed, "corpus", max_operand):
        texts.append(r["prompt"])
        texts += [
            text for text, _ in tool_demonstration(Prompt(r["prompt_id"], r["prompt"], r["answer"]), use_tool=True)
        ]
    return texts
