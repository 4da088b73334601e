"""A prompt as a chat: its messages (or one user turn), an optional system turn and its images'
parts, rendered by the model's chat template into the text and token ids the engine receives
(`data.chat_template`, `data.system_prompt`, `data.chat_template_kwargs`)."""

from __future__ import annotations

from dataclasses import replace

from rlhf_cluster.data.prompts import Prompt, image_parts

# For tokenizers without a chat template (the tiny built-in text model's): `role: content` lines, the
# assistant's ended by EOS. Every prefix of a conversation renders to a prefix of the whole, which is
# what supervised fine-tuning's locating of assistant turns relies on.
# (Literal text goes through {{ }}: the chat-template renderer trims newlines after block tags.)
STAND_IN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def chat_tokenizer(folder, built_in: bool):
    """The tokenizer of the model folder `folder`; a `built_in` model's (the tiny demo model's, which
    has no chat template) renders chats with `STAND_IN_CHAT_TEMPLATE`, as supervised fine-tuning renders
    them for it, so `data.chat_template` (and a messages column) runs on the embedded default. A user's
    model without a template stays without one: its prompts are refused with the reason."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if built_in and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = STAND_IN_CHAT_TEMPLATE
    return tokenizer


def with_images(chat: list[dict], count: int) -> list[dict]:
    """`chat` with `count` image parts before the text of its first user turn, unless its
    messages place their images themselves."""
    if not count or image_parts(chat):
        return chat
    first = next((n for n, m in enumerate(chat) if m["role"] == "user"), None)
    if first is None:
        raise ValueError("a prompt with images needs a user turn to hold them")
    turn = chat[first]
    text = turn["content"] if isinstance(turn["content"], list) else [{"type": "text", "text": turn["content"]}]
    placed = {"role": "user", "content": [{"type": "image"} for _ in range(count)] + text}
    return [*chat[:first], placed, *chat[first + 1 :]]


def apply_chat_template(
    prompts: list[Prompt], tokenizer, system_prompt: str | None = None, template_kwargs: dict | None = None
) -> list[Prompt]:
    """Each prompt as a chat (its messages, or one user turn after an optional system turn) put
    through the tokenizer's chat template with the generation prompt: `text` is the rendered
    string, `token_ids` the template's own encoding (what the engine receives), `messages` the chat
    rendered; every other field of the prompt is kept. A prompt's images become `{type: image}`
    parts before its first user turn's text (where its messages do not place them): the template
    writes one placeholder per image, which the model's processor expands to the image's tokens.
    `template_kwargs` (data.chat_template_kwargs, e.g. `enable_thinking`) are the template's extra
    variables: each must be one the template reads and none an argument of `apply_chat_template` itself."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "data.chat_template: the model's tokenizer has no chat template (tokenizer_config.json "
            "`chat_template`, or chat_template.jinja); set data.chat_template: false or use a tokenizer that has "
            "one (a messages column needs one)"
        )
    kwargs = dict(template_kwargs or {})
    _check_template_kwargs(tokenizer, kwargs)
    out = []
    for p in prompts:
        chat = list(p.messages) if p.messages else [{"role": "user", "content": p.text}]
        if system_prompt is not None and chat[0]["role"] != "system":
            chat = [{"role": "system", "content": system_prompt}, *chat]
        chat = with_images(chat, len(p.images))
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, **kwargs)
        ids = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, **kwargs)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        out.append(replace(p, text=text, token_ids=tuple(int(t) for t in ids), messages=tuple(chat)))
    return out


def _check_template_kwargs(tokenizer, kwargs: dict) -> None:
    """Each of `kwargs` is a variable the tokenizer's chat template(s) read, and none an argument of
    `apply_chat_template` itself (a template this parser cannot read is not checked)."""
    if not kwargs:
        return
    import inspect

    from jinja2 import Environment, TemplateSyntaxError, meta

    own = {"messages", "conversation", *inspect.signature(tokenizer.apply_chat_template).parameters}
    templates = tokenizer.chat_template
    try:
        names = set().union(*(
            meta.find_undeclared_variables(Environment(extensions=["jinja2.ext.loopcontrols"]).parse(t))
            for t in (templates.values() if isinstance(templates, dict) else [templates])
        ))  # fmt: skip
    except TemplateSyntaxError:
        names = set(kwargs)
    if wrong := sorted(k for k in kwargs if k in own or k not in names):
        raise ValueError(
            f"data.chat_template_kwargs: {', '.join(wrong)} is not a variable the model's chat template reads "
            "(or is an argument of apply_chat_template itself); expected e.g. enable_thinking for Qwen3"
        )
