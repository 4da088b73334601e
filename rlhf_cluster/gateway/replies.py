"""The model's turn as an OpenAI assistant message, parsed by the installed vLLM's own parsers.

`generation.agent.tool_parser` and `generation.agent.reasoning_parser` take the names `vllm serve
--tool-call-parser` and `--reasoning-parser` take (`hermes`, `llama3_json`, `mistral`,
`qwen3_coder`, `kimi_k2`, `openai`, ...; `qwen3`, `deepseek_r1`, ...): vLLM maintains a parser per
model family's format, so none is written here. The reasoning parser splits the turn's thinking
into `reasoning_content`; the tool parser, when the request offered tools, turns the model's
tool-call text into OpenAI `tool_calls`. Both read the turn's text with special tokens kept
(tool-call markers are special tokens in many vocabularies), the token that ended the turn left
out.

Also here: the reply's other OpenAI parts (its usage, the stop string left out of its text, a
finished reply as server-sent events for a streaming request).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from fastapi.responses import StreamingResponse

from rlhf_cluster.generation.engine_outputs import Turn

DEFAULT_TOOL_PARSER = "hermes"


def tool_parser_names() -> list[str]:
    from vllm.tool_parsers import ToolParserManager

    return sorted(ToolParserManager.list_registered())


def reasoning_parser_names() -> list[str]:
    from vllm.reasoning import ReasoningParserManager

    return sorted(ReasoningParserManager.list_registered())


def parser_problems(tool_parser: str, reasoning_parser: str | None) -> list[str]:
    """Refusals for parser names the installed vLLM does not have (each with the list it has)."""
    problems = []
    if tool_parser not in (names := tool_parser_names()):
        problems.append(
            f"generation.agent.tool_parser: {tool_parser!r} is not a tool parser of the installed vLLM; "
            f"expected one of {', '.join(names)}"
        )
    if reasoning_parser is not None and reasoning_parser not in (names := reasoning_parser_names()):
        problems.append(
            f"generation.agent.reasoning_parser: {reasoning_parser!r} is not a reasoning parser of the "
            f"installed vLLM; expected one of {', '.join(names)}"
        )
    return problems


class ReplyParser:
    """One tokenizer's parsers. Built where the gateway starts: a parser that needs marker tokens
    the vocabulary lacks (e.g. `llama3_json` without `<|python_tag|>`) fails there, with vLLM's
    reason, not at the first tool call."""

    def __init__(self, tokenizer, tool_parser: str = DEFAULT_TOOL_PARSER, reasoning_parser: str | None = None):
        from vllm.reasoning import ReasoningParserManager
        from vllm.tool_parsers import ToolParserManager

        problems = parser_problems(tool_parser, reasoning_parser)
        if problems:
            raise ValueError("; ".join(problems))
        self.tokenizer = tokenizer
        self._tools = ToolParserManager.get_tool_parser(tool_parser)
        self._tools(tokenizer, None)  # its checks of the vocabulary, now
        self._reasoning = (
            None
            if reasoning_parser is None
            else ReasoningParserManager.get_reasoning_parser(reasoning_parser)(tokenizer)
        )

    @property
    def reads_reasoning(self) -> bool:
        return self._reasoning is not None

    def message(self, text: str, tools: list | None) -> dict[str, Any]:
        """The assistant message for a turn whose text (special tokens kept) is `text`."""
        request = _request(tools)
        reasoning: str | None = None
        content: str | None = text
        if self._reasoning is not None:
            reasoning, content = self._reasoning.extract_reasoning(text, request)
        calls: list[dict] = []
        if tools and content:
            # A parser keeps per-request state (for streaming): one per turn.
            found = self._tools(self.tokenizer, None).extract_tool_calls(content, request)
            if found.tools_called:
                calls = [
                    {
                        "id": call.id or f"call_{uuid.uuid4().hex[:16]}",
                        "type": "function",
                        "function": {"name": call.function.name, "arguments": call.function.arguments},
                    }
                    for call in found.tool_calls
                ]
                content = (found.content or "").strip()
        message: dict[str, Any] = {"role": "assistant", "content": content or None}
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = calls
        return message


def _request(tools: list | None):
    """What vLLM's parsers read of a request (the tools offered and the tool choice)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest(messages=[{"role": "user", "content": ""}], model="policy", tools=tools or None)


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop") or []
    return [stop] if isinstance(stop, str) else list(stop)


def without_stop(text: str, turn: Turn, body: dict) -> str:
    """OpenAI leaves the stop string that ended a turn out of its text (the tokens keep it)."""
    for s in stop_strings(body):
        if turn.finish_reason == "stop" and text.endswith(s):
            return text[: -len(s)]
    return text


def usage(context: list[int], turn: Turn) -> dict:
    return {
        "prompt_tokens": len(context),
        "completion_tokens": len(turn.token_ids),
        "total_tokens": len(context) + len(turn.token_ids),
    }


def stream_chat(reply: dict, include_usage: bool = False) -> StreamingResponse:
    """A finished reply as OpenAI server-sent events: one delta with the whole turn, then its end;
    with `include_usage` (the request's `stream_options.include_usage`) a last chunk of no choices
    and the reply's usage, as OpenAI and vLLM send it."""
    choice = reply["choices"][0]
    delta = {k: v for k, v in choice["message"].items() if v is not None}
    if "tool_calls" in delta:
        delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(delta["tool_calls"])]
    head = {k: reply[k] for k in ("id", "created", "model")}

    def events():
        for part, finish in ((delta, None), ({}, choice["finish_reason"])):
            chunk = {
                **head,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": part, "finish_reason": finish}],
            }
            yield f"data: {json.dumps(chunk)}\n\n"
        if include_usage:
            chunk = {**head, "object": "chat.completion.chunk", "choices": [], "usage": reply["usage"]}
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
