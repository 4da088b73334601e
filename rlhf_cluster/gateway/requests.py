"""What the gateway refuses before it samples, as an OpenAI endpoint refuses it.

- A model it does not serve: 404, code `model_not_found` (an agent written for `gpt-4` learns at
  its first call that it talks to something else).
- Chat messages and tools that do not fit OpenAI's schema: 400 naming the field. They are checked
  against the request types the `openai` package ships (its TypedDicts, validated by pydantic;
  each message by the type of its role), not by hand. Only function tools are served.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from typing import Any

from pydantic import TypeAdapter, ValidationError

ROLES = ("system", "developer", "user", "assistant", "tool")


class RequestRefused(ValueError):
    """A request an OpenAI endpoint would refuse: HTTP `status`, the `param` at fault, OpenAI's `code`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestRefused(400, "model: you must provide a model parameter", "model")
    if model != served:
        raise RequestRefused(
            404,
            f"The model `{model}` does not exist or you do not have access to it (this gateway serves `{served}`)",
            "model",
            "model_not_found",
        )


def check_chat(body: dict, served: str) -> None:
    """A chat completion request's model, messages and tools."""
    check_model(body, served)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestRefused(400, "messages: expected a non-empty list of message objects", "messages")
    types = _types()
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise RequestRefused(
                400, f"messages[{i}].role: expected one of {', '.join(ROLES)}, got {role!r}", f"messages[{i}].role"
            )
        _validate(types[role], message, f"messages[{i}]")
    tools = body.get("tools")
    if tools is None:
        return
    if not isinstance(tools, list):
        raise RequestRefused(400, "tools: expected a list of tool objects", "tools")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise RequestRefused(400, f"tools[{i}].type: only function tools are served", f"tools[{i}].type")
        _validate(types["function tool"], tool, f"tools[{i}]")


@cache
def _types() -> dict[str, TypeAdapter]:
    from openai.types.chat import (
        ChatCompletionAssistantMessageParam,
        ChatCompletionDeveloperMessageParam,
        ChatCompletionFunctionToolParam,
        ChatCompletionSystemMessageParam,
        ChatCompletionToolMessageParam,
        ChatCompletionUserMessageParam,
    )

    return {
        "system": TypeAdapter(ChatCompletionSystemMessageParam),
        "developer": TypeAdapter(ChatCompletionDeveloperMessageParam),
        "user": TypeAdapter(ChatCompletionUserMessageParam),
        "assistant": TypeAdapter(ChatCompletionAssistantMessageParam),
        "tool": TypeAdapter(ChatCompletionToolMessageParam),
        "function tool": TypeAdapter(ChatCompletionFunctionToolParam),
    }


def _validate(adapter: TypeAdapter, value: Any, where: str) -> None:
    try:
        _consume(adapter.validate_python(value))  # the types' Iterable fields validate as they are read
    except ValidationError as exc:
        _refuse(where, (), exc)
    except _Inside as inside:
        _refuse(where, inside.loc, inside.error)


class _Inside(Exception):
    """A ValidationError raised while reading an Iterable field, with that field's location."""

    def __init__(self, loc: tuple, error: ValidationError):
        self.loc, self.error = loc, error


def _consume(value: Any, loc: tuple = ()) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _consume(item, (*loc, key))
    elif isinstance(value, Iterable) and not isinstance(value, str | bytes):
        try:
            for item in value:  # (an item's own location is in the error)
                _consume(item, loc)
        except ValidationError as exc:
            raise _Inside(loc, exc) from None


def _refuse(where: str, prefix: tuple, exc: ValidationError):
    by_path: dict[str, list[str]] = {}
    inputs: dict[str, Any] = {}
    for error in exc.errors():
        path = _path((*prefix, *error["loc"]))
        by_path.setdefault(path, []).append(error["msg"])
        inputs.setdefault(path, error.get("input"))
    path, reasons = next(iter(by_path.items()))
    field = where + ("" if not path else path if path.startswith("[") else f".{path}")
    raise RequestRefused(400, f"{field}: {' or '.join(dict.fromkeys(reasons))} (got {inputs[path]!r:.80})", field)


def _path(loc: tuple) -> str:
    """The field path of a pydantic error location, without the union branches' type names."""
    parts = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif part.isidentifier() and part[0].islower() and part not in ("str", "int", "float", "bool", "dict", "list"):
            parts.append(f".{part}")
    return "".join(parts).lstrip(".")
