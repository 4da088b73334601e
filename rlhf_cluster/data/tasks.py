"""Built-in prompt tasks with rule-based verifiers.

A task writes its prompts as a parquet file (columns `prompt_id`, `prompt`, `answer`) that is
read back through the same `PromptSource` a user's dataset goes through, and names a verifier
that scores a response against the answer.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PROMPT_COLUMNS = ("prompt_id", "prompt", "answer")
IMAGE_COLUMN = "images"  # a visual task's images: a list of encoded images (PNG bytes) per row


ARITHMETIC_OPERAND_MAX = 49
ARITHMETIC_EVAL_PAIRS = 256


def held_out_pairs(max_operand: int) -> int:
    """How many operand pairs are held out: 256, or 30% of all pairs when there are fewer."""
    return min(ARITHMETIC_EVAL_PAIRS, (max_operand + 1) ** 2 * 3 // 10)


def arithmetic_rows(num: int, seed: int, split: str = "train", max_operand: int = ARITHMETIC_OPERAND_MAX) -> list[dict]:
    """Addition problems `a+b=` with their answers, operands in 0..max_operand.

    The operand pairs are split once per seed: the first `held_out_pairs` of a seeded shuffle
    are held out for `split="eval"`; every other split draws from the rest, so no held-out sum
    is ever trained on.
    """
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    random.Random(seed).shuffle(pairs)
    held_out = held_out_pairs(max_operand)
    if split == "eval":
        if num > held_out:
            raise ValueError(
                f"data.eval_prompts: at most {held_out} held-out prompts with max_operand={max_operand}, asked for "
                f"{num}"
            )
        chosen = pairs[:num]
    else:
        rng = random.Random(f"{seed}-{split}")
        allowed = pairs[held_out:]  # sliced once: with operands up to 999 it is a million pairs
        chosen = [rng.choice(allowed) for _ in range(num)]
    return [
        {"prompt_id": f"{split}-{i}", "prompt": f"{a}+{b}=", "answer": str(a + b)} for i, (a, b) in enumerate(chosen)
    ]


def arithmetic_corpus(num: int = 4000, seed: int = 1234) -> list[str]:
    """Text the tiny tokenizer is trained on: prompts followed by their answers."""
    return [r["prompt"] + r["answer"] for r in arithmetic_rows(num, seed, "corpus")]


def write_prompt_file(rows: list[dict], path: Path) -> Path:
    """Write prompt rows as parquet, atomically (temp name, then rename); rows with an `images`
    key keep it as a list<binary> column."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [(c, pa.string()) for c in PROMPT_COLUMNS]
    if rows and IMAGE_COLUMN in rows[0]:
        fields.append((IMAGE_COLUMN, pa.list_(pa.binary())))
    table = pa.Table.from_pylist(rows, schema=pa.schema(fields))
    tmp = path.with_suffix(path.suffix + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


_NUMBER = re.compile(r"-?\d+")


def verify_arithmetic(response: str, answer: str) -> dict[str, float]:
    """Reward components for one response.

    `correct`: the response is exactly the answer (surrounding whitespace aside).
    `digits`: the share of non-space characters that are digits. This dense term gives a
    random model a learnable signal (non-zero group variance) long before it gets a sum right.
    """
    text = response.strip()
    chars = [c for c in text if not c.isspace()]
    digits = sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0
    return {"correct": float(text == answer and _NUMBER.fullmatch(text) is not None), "digits": digits}


def combine_reward(components: dict[str, float], weights: dict[str, float]) -> float:
    """Weighted sum of reward components (weights name the components they use)."""
    return float(sum(weights[k] * v for k, v in components.items() if k in weights))
