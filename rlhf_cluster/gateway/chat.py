"""Chat rendering for the gateway.

The first request of an episode is rendered whole by the model's chat template. Later requests
are never re-rendered: the engine's exact tokens so far stay the context, and only the messages
the agent added are rendered and appended. Their text is what the template writes for them after
an assistant turn, found by rendering a fixed two-message conversation with and without them, so
templates that rewrite earlier turns (e.g. drop `<think>` blocks) cannot change the prefix.

An assistant message's `tool_calls` are given to the template as dicts (the template writes them
in the model's own format); the model's tool-call text is parsed back by vLLM's parsers
(`replies`). The default template (for tokenizers without one) writes the Hermes format.
"""

from __future__ import annotations

import json

from rlhf_cluster.gateway.images import image_key

# For tokenizers without a chat template (the tiny test models): roles as tags, tools listed in a
# system turn, tool calls in the Hermes format, and EOS closing each assistant turn.
GATEWAY_CHAT_TEMPLATE = (
    "{% if tools %}<|tools|>\n{{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% for c in m['tool_calls'] or [] %}<tool_call>{\"name\": \"{{ c['function']['name'] }}\", \"arguments\": "
    "{{ c['function']['arguments'] | tojson }}}</tool_call>{% endfor %}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_MARK = "\u2063gateway-assistant\u2063"  # assistant content no template writes by itself


class ChatError(ValueError):
    """A request the gateway cannot render (answered with HTTP 400)."""


def template_of(tokenizer) -> str | None:
    """The chat template to use: the tokenizer's own, or the gateway's default (None: the tokenizer's)."""
    return None if getattr(tokenizer, "chat_template", None) else GATEWAY_CHAT_TEMPLATE


def for_template(message: dict) -> dict:
    """A message as chat templates expect it: content a string (or, where it holds images, a list
    of `{type: text}` and `{type: image}` parts, each image where the template writes its
    placeholder), tool-call arguments a dict."""
    out = {"role": message.get("role"), "content": _content(message.get("content"))}
    if message.get("tool_calls"):
        out["tool_calls"] = [
            {
                "type": "function",
                "id": c.get("id"),
                "function": {"name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments"))},
            }
            for c in message["tool_calls"]
        ]
    for key in ("name", "tool_call_id"):
        if message.get(key) is not None:
            out[key] = message[key]
    return out


def render(tokenizer, messages: list[dict], tools: list | None, generation_prompt: bool) -> str:
    """The template's text for `messages` (the model's turn opened with `generation_prompt`)."""
    if not messages:
        raise ChatError("messages: expected at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise ChatError(f"messages[{i}]: expected an object with role system, user, assistant or tool")
    try:
        return tokenizer.apply_chat_template(
            [for_template(m) for m in messages],
            tools=tools or None,
            tokenize=False,
            add_generation_prompt=generation_prompt,
            chat_template=template_of(tokenizer),
        )
    except Exception as exc:  # jinja errors: a template that cannot take these messages
        raise ChatError(f"the chat template cannot render these messages: {type(exc).__name__}: {exc}") from exc


def continuation_text(tokenizer, turn_text: str, new_messages: list[dict], tools: list | None) -> str:
    """The text that follows a model turn (`turn_text`, special tokens included) when the agent
    adds `new_messages`: the rest of the template's end of an assistant turn, then the new
    messages and the next generation prompt."""
    base = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _MARK}]
    before = render(tokenizer, base, tools, generation_prompt=False)
    after = render(tokenizer, base + new_messages, tools, generation_prompt=True)
    if not after.startswith(before):
        raise ChatError(
            "the chat template renders earlier turns differently once new messages follow, so turns "
            "cannot be appended token for token"
        )
    tail = before.split(_MARK)[-1]  # what the template writes after an assistant's content (e.g. "<|im_end|>\n")
    done = next(k for k in range(len(tail), -1, -1) if turn_text.endswith(tail[:k]))
    return tail[done:] + after[len(before) :]


def same_message(a: dict, b: dict) -> bool:
    """Whether two messages say the same to the model (role, content, tool calls' names and
    arguments; call ids and client-side fields such as `refusal` are ignored)."""

    def key(m: dict):
        calls = [
            (c["function"]["name"], json.dumps(_arguments(c["function"].get("arguments")), sort_keys=True))
            for c in m.get("tool_calls") or ()
        ]
        return m.get("role"), _text(m.get("content")), _images(m.get("content")), calls

    return key(a) == key(b)


def _is_image(part) -> bool:
    return isinstance(part, dict) and part.get("type") == "image_url"


def _content(content):
    """Content for the template: text, or the parts of content that holds images."""
    if isinstance(content, list) and any(_is_image(p) for p in content):
        return [
            {"type": "image"} if _is_image(p) else {"type": "text", "text": p.get("text", "")}
            for p in content
            if isinstance(p, dict) and p.get("type") in ("text", "image_url")
        ]
    return _text(content)


def _images(content) -> list[str]:
    """What identifies content's images (a digest of each URL), in order."""
    return [image_key(p) for p in content if _is_image(p)] if isinstance(content, list) else []


def _text(content) -> str:
    """OpenAI content: a string, None, or a list of parts (their text joined)."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def _arguments(arguments):
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return arguments
    return arguments or {}
