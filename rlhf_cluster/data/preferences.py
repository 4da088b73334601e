"""Preference pairs for reward-model training: a prompt with a chosen and a rejected response.

From a file (.parquet/.jsonl with columns `prompt`, `chosen`, `rejected`, optional `margin`), or
generated for the built-in arithmetic task: the correct sum is chosen over a wrong one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from rlhf_cluster.data.prompts import read_table
from rlhf_cluster.data.row_names import row_name
from rlhf_cluster.data.sft import plain_parts
from rlhf_cluster.data.tasks import arithmetic_rows


@dataclass
class PreferencePair:
    """`chosen` is preferred to `rejected` for `prompt`; `margin` (>= 0) asks for at least that score gap."""

    prompt: str
    chosen: str
    rejected: str
    margin: float = 0.0


def read_preference_file(path: str | Path) -> list[PreferencePair]:
    """Pairs from a file; errors name the file, the row (its line in a .jsonl file, see `row_name`)
    and the field."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"preference file {file} does not exist")
    table = read_table(file, "preference file")
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in table.column_names]
    if missing:
        raise ValueError(f"preference file {file}: missing column(s) {missing}; it has {table.column_names}")
    rows = table.to_pylist()
    if not rows:
        raise ValueError(f"preference file {file} has no rows")
    pairs = []
    for i, row in enumerate(rows):
        problem = _pair_problem(row)
        if problem:
            raise ValueError(f"preference file {file}, {row_name(file, i, len(rows))}: {problem}")
        pairs.append(PreferencePair(row["prompt"], row["chosen"], row["rejected"], float(row.get("margin") or 0.0)))
    return pairs


def _pair_problem(row: dict) -> str | None:
    """What is wrong with a preference row (None: nothing)."""
    for column in ("prompt", "chosen", "rejected"):
        if not isinstance(row[column], str) or not row[column]:
            return f"{column} must be a non-empty string, got {row[column]!r}"
    if row["chosen"] == row["rejected"]:
        return "chosen and rejected are the same text"
    margin = row.get("margin") or 0.0
    if not isinstance(margin, (int, float)) or margin < 0:
        return f"margin must be a number >= 0, got {margin!r}"
    return None


def arithmetic_preference_pairs(
    num: int, seed: int, split: str, max_operand: int, per_prompt: int = 1
) -> list[PreferencePair]:
    """The correct sum over a wrong one, `per_prompt` pairs for each of `num` prompts of `split`
    ("eval": held-out operand pairs only).

    Half of the wrong answers are near misses (off by 1-3), half the sum of two other random
    operands: drawn like correct answers, so their lengths match and length alone gives nothing away.
    """
    rng = random.Random(f"{seed}-preferences-{split}")
    pairs = []
    for row in arithmetic_rows(num, seed, split, max_operand):
        answer = int(row["answer"])
        for _ in range(per_prompt):
            while True:
                if rng.random() < 0.5:
                    wrong = answer + rng.choice([-3, -2, -1, 1, 2, 3])
                else:
                    wrong = rng.randint(0, max_operand) + rng.randint(0, max_operand)
                if wrong != answer and wrong >= 0:
                    break
            pairs.append(PreferencePair(row["prompt"], row["answer"], str(wrong)))
    return pairs


def encode_response(tokenizer, prompt: str, response: str) -> list[int]:
    """What a rollout of `response` to `prompt` looks like to the reward model."""
    prompt_ids, response_ids = plain_parts(tokenizer, prompt, response)
    return prompt_ids + response_ids
