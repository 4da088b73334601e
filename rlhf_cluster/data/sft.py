"""Supervised fine-tuning data: conversations become `(input_ids, labels)` with the loss on
assistant tokens only.

A row is either single-turn (`prompt`, `response`) or multi-turn (`messages`: a list of
`{"role", "content"}`); both are rendered with the tokenizer's chat template (or, for a tokenizer
without one, `STAND_IN_CHAT_TEMPLATE`). Labels are `-100` everywhere except the tokens of every
assistant turn, found from character offsets of the rendered text, so they are exact for the full
tokenization (no re-tokenised fragments). Padding masks come from lengths, never from token ids:
the pad id may equal EOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_cluster.data.chat_template import STAND_IN_CHAT_TEMPLATE
from rlhf_cluster.data.prompts import read_table
from rlhf_cluster.data.row_names import row_name

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


@dataclass
class SFTExample:
    """One tokenised conversation: `labels[i]` is `input_ids[i]` on assistant tokens, -100 elsewhere."""

    input_ids: list[int]
    labels: list[int]


def read_sft_file(path: str | Path) -> list[list[dict]]:
    """Conversations from .parquet/.jsonl: columns `prompt` + `response`, or `messages`.

    Errors name the file, the row (its line in a .jsonl file, see `row_name`) and what was expected.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"SFT file {file} does not exist")
    table = read_table(file, "SFT file")
    columns = set(table.column_names)
    if "messages" in columns:
        conversations = table.column("messages").to_pylist()
    elif {"prompt", "response"} <= columns:
        conversations = [
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
            for p, r in zip(table.column("prompt").to_pylist(), table.column("response").to_pylist())
        ]
    else:
        raise ValueError(f"SFT file {file}: expected columns prompt + response, or messages; it has {sorted(columns)}")
    if not conversations:
        raise ValueError(f"SFT file {file} has no rows")
    for i, messages in enumerate(conversations):
        try:
            _check_conversation(messages, "")
        except ValueError as exc:  # the row is named only now: a .jsonl row's line is found by reading the file
            raise ValueError(f"SFT file {file}, {row_name(file, i, len(conversations))}{exc}") from None
    return conversations


def _check_conversation(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of messages")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(
                f"{where}, message {j}: expected {{'role': one of {list(ROLES)}, 'content': str}}, got {m!r}"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant message, so nothing to learn")


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    template = None if getattr(tokenizer, "chat_template", None) else STAND_IN_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def tokenize_conversation(tokenizer, messages: list[dict]) -> SFTExample:
    """Render with the chat template and label exactly the tokens of every assistant turn."""
    _check_conversation(messages, "conversation")
    text = _render(tokenizer, messages)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:k], add_generation_prompt=True)
        through = _render(tokenizer, messages[: k + 1])
        if not text.startswith(before) or not text.startswith(through):
            raise ValueError(
                "the tokenizer's chat template does not render a conversation's prefix as a prefix of it; "
                "assistant turns cannot be located"
            )
        spans.append((len(before), len(through)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [
        tok if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
        for tok, (start, _end) in zip(ids, enc["offset_mapping"])
    ]
    return SFTExample(ids, labels)


def collate(examples: list[SFTExample], pad_id: int = 0, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to the longest example: `input_ids`, `attention_mask` (from lengths), `labels` (-100 on pads)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[i, cols] = torch.tensor(e.input_ids)
        labels[i, cols] = torch.tensor(e.labels)
        mask[i, cols] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def plain_parts(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """The built-in task's own format (what RL prompts and rollouts look like): prompt ids, and
    response ids + EOS, tokenised apart as the RL pipeline sees them."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return prompt_ids, tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def tokenize_plain(tokenizer, prompt: str, response: str) -> SFTExample:
    """`plain_parts` with the response (and its EOS) labelled."""
    prompt_ids, response_ids = plain_parts(tokenizer, prompt, response)
    return SFTExample(prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids)
