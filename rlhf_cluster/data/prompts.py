"""Prompt sources: a parquet or jsonl file read with pyarrow, served in a seeded order.

Built-in tasks write their prompts to parquet first and come back through this same reader,
so a user's dataset and the demo take one path.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from rlhf_cluster.config import DataConfig
from rlhf_cluster.data.tasks import arithmetic_rows, write_prompt_file


@dataclass(frozen=True)
class Prompt:
    """One prompt with the reference answer its verifier checks against."""

    prompt_id: str
    text: str
    answer: str


PROMPT_SUFFIXES = (".parquet", ".jsonl", ".json")


def read_table(file: Path, what: str = "prompt file") -> pa.Table:
    """A .parquet or .jsonl file as an Arrow table; errors start with `what` and the file name."""
    if file.suffix not in PROMPT_SUFFIXES:
        raise ValueError(
            f"{what} {file}: expected a .parquet or .jsonl file (one JSON object per line), got suffix {file.suffix!r}"
        )
    try:
        if file.suffix == ".parquet":
            return pq.read_table(file)
        return pa_json.read_json(file)
    except (pa.ArrowException, OSError) as exc:
        # ArrowInvalid covers corrupt/truncated parquet and JSON parse errors; OSError covers
        # unreadable files (permissions, a directory, I/O errors).
        kind = "parquet" if file.suffix == ".parquet" else "JSON Lines (one JSON object per line, same keys and types on every line)"
        raise ValueError(f"{what} {file} could not be read as {kind}: {exc}") from exc


def read_prompt_file(path: str | Path) -> list[Prompt]:
    """Read prompts from .parquet or .jsonl (columns `prompt_id`, `prompt`, optional `answer`).

    Every error names the file and what was expected: missing file, wrong suffix, a file that
    does not parse, missing columns, no rows, null/empty/duplicate ids, empty prompts.
    """
    file = Path(path).expanduser()
    if not file.exists():
        raise FileNotFoundError(f"prompt file {file} does not exist")
    if not file.is_file():
        raise ValueError(f"prompt file {file} is not a regular file (a directory?); expected a .parquet or .jsonl file")
    if file.stat().st_size == 0:
        raise ValueError(f"prompt file {file} is empty (0 bytes): expected rows with columns prompt_id, prompt")
    table = read_table(file)
    if table.num_rows == 0 and not table.column_names:  # a jsonl file of blank lines
        raise ValueError(f"prompt file {file} has no rows: expected rows with columns prompt_id, prompt")
    missing = [c for c in ("prompt_id", "prompt") if c not in table.column_names]
    if missing:
        raise ValueError(f"prompt file {file}: missing column(s) {missing}; it has {table.column_names}")
    if table.num_rows == 0:
        raise ValueError(f"prompt file {file} has no rows: expected at least one prompt")
    raw_ids = table.column("prompt_id").to_pylist()
    if any(x is None for x in raw_ids):
        raise ValueError(f"prompt file {file}: prompt_id has null values (row {raw_ids.index(None)})")
    ids = [str(x) for x in raw_ids]
    if "" in ids:
        raise ValueError(f"prompt file {file}: prompt_id has empty values (row {ids.index('')})")
    if len(set(ids)) != len(ids):
        dupes = [i for i, count in Counter(ids).items() if count > 1]
        raise ValueError(f"prompt file {file}: prompt_id values are not unique (repeated: {dupes[:5]})")
    texts = table.column("prompt").to_pylist()
    answers = table.column("answer").to_pylist() if "answer" in table.column_names else [""] * len(ids)
    bad = [i for i, t in zip(ids, texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise ValueError(f"prompt file {file}: empty or non-string prompt for prompt_id(s) {bad[:5]}")
    return [Prompt(i, t, "" if a is None else str(a)) for i, t, a in zip(ids, texts, answers)]


def _write_task_file(rows: list[dict], path: Path) -> Path:
    try:
        return write_prompt_file(rows, path)
    except BaseException:
        # write_prompt_file renames a temp file into place; a failed write must not leave it behind.
        path.with_suffix(path.suffix + ".tmp").unlink(missing_ok=True)
        raise


def prepare_prompt_files(cfg: DataConfig, run_dir: str | Path) -> tuple[Path, Path | None]:
    """The train (and, for built-in tasks, held-out eval) prompt files of a job."""
    if cfg.path is not None:
        return Path(cfg.path).expanduser(), None
    data_dir = Path(run_dir) / "data"
    train = _write_task_file(arithmetic_rows(cfg.num_prompts, cfg.seed, "train", cfg.max_operand), data_dir / "train.parquet")
    held_out = None
    if cfg.eval_prompts:
        held_out = _write_task_file(arithmetic_rows(cfg.eval_prompts, cfg.seed, "eval", cfg.max_operand), data_dir / "eval.parquet")
    return train, held_out


class PromptSource:
    """Serves prompts in a seeded order, epoch after epoch; its cursor is checkpointable."""

    def __init__(self, prompts: list[Prompt], seed: int = 0, shuffle: bool = True):
        if not prompts:
            raise ValueError("PromptSource needs at least one prompt")
        self._prompts = prompts
        self._seed = seed
        self._shuffle = shuffle
        self.epoch = 0
        self.cursor = 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        order = list(range(len(self._prompts)))
        if self._shuffle:
            random.Random(self._seed * 100_003 + self.epoch).shuffle(order)
        return order

    def next_prompt(self) -> Prompt:
        if self.cursor == len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._epoch_order()
        prompt = self._prompts[self._order[self.cursor]]
        self.cursor += 1
        return prompt

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._epoch_order()
