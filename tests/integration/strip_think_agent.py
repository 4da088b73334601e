"""An agent that rewrites its history as reasoning harnesses do: before each new request it
strips the `<think>` block from its earlier assistant replies (the tiny model writes none, so it
keeps the second half of the reply's text instead: the history is rewritten either way). For the
test it saves, per episode, what each call sent and what each reply carried (the gateway's `rlhf`
field: token ids; and the log-probs)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from openai import OpenAI

TRACES = Path(tempfile.gettempdir()) / "strip-think-agent-traces"


def _stripped(text: str) -> str:
    return text.split("</think>")[-1].strip() if "</think>" in text else text[len(text) // 2:]


def run(base_url: str, api_key: str, messages: list[dict]) -> float:
    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
    calls = []
    for turn in range(3):
        sent = [dict(m) for m in messages]
        reply = client.chat.completions.create(model="policy", messages=sent, max_tokens=5, logprobs=True)
        content = reply.choices[0].message.content or ""
        calls.append({"sent": sent, "token_ids": reply.model_extra["rlhf"]["token_ids"],
                      "logprobs": [t.logprob for t in reply.choices[0].logprobs.content]})
        # The earlier replies lose their reasoning; the newest is kept as written.
        messages = [{**m, "content": _stripped(m["content"])} if m["role"] == "assistant" else m for m in messages]
        messages += [{"role": "assistant", "content": content}, {"role": "user", "content": f"go on {turn}"}]
    TRACES.mkdir(exist_ok=True)
    episode = base_url.rstrip("/").split("/")[-2]
    (TRACES / f"{episode}.json").write_text(json.dumps(calls))
    return float(sum(c.isdigit() for c in content) > 0)
