"""An agent as a user writes it: a loop over the `openai` client with a calculator tool. It knows
nothing of rlhf_cluster beyond the gateway's URL; for the test it also saves, per episode, the
token ids and log-probs each reply carried (the gateway's `rlhf` field) and the messages it sent."""

from __future__ import annotations

import ast
import json
import operator
import tempfile
from pathlib import Path

from openai import OpenAI

TRACES = Path(tempfile.gettempdir()) / "calculator-agent-traces"
NUDGE = "Use the calculator."
TOOLS = [{"type": "function", "function": {  # short: the tiny test model's context is 256 tokens
    "name": "calculator", "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}}]
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def calculate(expression: str) -> str:
    def value(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise ValueError("not arithmetic")
    try:
        return str(value(ast.parse(expression, mode="eval").body))
    except (SyntaxError, ValueError):
        return "error: not an arithmetic expression"


def run(base_url: str, api_key: str, messages: list[dict]) -> float:
    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
    replies, digits = [], False
    for _ in range(3):
        reply = client.chat.completions.create(model="policy", messages=messages, tools=TOOLS, max_tokens=6,
                                               logprobs=True)
        message = reply.choices[0].message
        replies.append({"token_ids": reply.model_extra["rlhf"]["token_ids"],
                        "logprobs": [t.logprob for t in reply.choices[0].logprobs.content]})
        messages.append(message.model_dump(exclude_none=True))
        digits |= any(c.isdigit() for c in message.content or "")
        for call in message.tool_calls or ():
            expression = json.loads(call.function.arguments).get("expression", "")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": calculate(expression)})
        if not message.tool_calls:
            messages.append({"role": "user", "content": NUDGE})
    TRACES.mkdir(exist_ok=True)
    episode = base_url.rstrip("/").split("/")[-2]
    (TRACES / f"{episode}.json").write_text(json.dumps({"replies": replies, "messages": messages}))
    return 1.0 if digits else 0.0  # the agent's own reward: did the model write any number
