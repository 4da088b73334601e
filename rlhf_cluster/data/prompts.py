"""Prompt sources: a parquet or jsonl file read with pyarrow, served in a seeded order.

Built-in tasks write their prompts to parquet first and come back through this same reader,
so a user's dataset and the demo take one path.
"""

from __future__ import annotations

import random
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


def read_prompt_file(path: str | Path) -> list[Prompt]:
    """Read prompts from .parquet or .jsonl; errors name the file and the missing column."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"prompt file {file} does not exist")
    try:
        if file.suffix == ".parquet":
            table = pq.read_table(file)
        elif file.suffix in (".jsonl", ".json"):
            table = pa_json.read_json(file)
        else:
            raise ValueError(f"prompt file {file}: expected a .parquet or .jsonl file")
    except pa.ArrowInvalid as exc:
        raise ValueError(f"prompt file {file} could not be read: {exc}") from exc
    missing = [c for c in ("prompt_id", "prompt") if c not in table.column_names]
    if missing:
        raise ValueError(f"prompt file {file}: missing column(s) {missing}; it has {table.column_names}")
    raw_ids = table.column("prompt_id").to_pylist()
    if any(x is None for x in raw_ids):
        raise ValueError(f"prompt file {file}: prompt_id has null values (row {raw_ids.index(None)})")
    ids = [str(x) for x in raw_ids]
    if len(set(ids)) != len(ids):
        raise ValueError(f"prompt file {file}: prompt_id values are not unique")
    texts = table.column("prompt").to_pylist()
    answers = table.column("answer").to_pylist() if "answer" in table.column_names else [""] * len(ids)
    bad = [i for i, t in zip(ids, texts) if not isinstance(t, str) or not t]
    if bad:
        raise ValueError(f"prompt file {file}: empty or non-string prompt for prompt_id(s) {bad[:5]}")
    return [Prompt(i, t, "" if a is None else str(a)) for i, t, a in zip(ids, texts, answers)]


def prepare_prompt_files(cfg: DataConfig, run_dir: str | Path) -> tuple[Path, Path | None]:
    """The train (and, for built-in tasks, held-out eval) prompt files of a job."""
    if cfg.path is not None:
        return Path(cfg.path).expanduser(), None
    data_dir = Path(run_dir) / "data"
    train = write_prompt_file(arithmetic_rows(cfg.num_prompts, cfg.seed, "train"), data_dir / "train.parquet")
    held_out = None
    if cfg.eval_prompts:
        held_out = write_prompt_file(arithmetic_rows(cfg.eval_prompts, cfg.seed, "eval"), data_dir / "eval.parquet")
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
