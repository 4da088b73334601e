"""Prompt sources: a parquet, jsonl or save_to_disk dataset read with pyarrow (columns mapped by
`data.columns`, chat templates applied), served in a seeded order.

Built-in tasks write their prompts to parquet first and come back through this same reader,
so a user's dataset and the demo take one path.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from rlhf_cluster.config import DataConfig, PromptColumns
from rlhf_cluster.data.tasks import arithmetic_rows, write_prompt_file


@dataclass(frozen=True)
class Prompt:
    """One prompt with the reference answer its verifier checks against. `token_ids`, when set
    (a chat-templated prompt), are exactly what the engine receives; otherwise it encodes `text`."""

    prompt_id: str
    text: str
    answer: str
    token_ids: tuple[int, ...] | None = None
    messages: tuple[dict, ...] | None = None  # a chat `messages` column, rendered by `apply_chat_template`
    source: str | None = None  # where the prompt comes from (`data.columns.source`): evaluation reports per source

    def encode(self, tokenizer) -> list[int]:
        """The prompt's token ids as the engine sees them."""
        return list(self.token_ids) if self.token_ids is not None else tokenizer(self.text)["input_ids"]


Segment = tuple[str, bool]  # a piece of a demonstrated response, and whether a warm-up's loss covers it

PROMPT_SUFFIXES = (".parquet", ".jsonl", ".json")


def read_table(file: Path, what: str = "prompt file") -> pa.Table:
    """A .parquet or .jsonl file, or a `datasets.save_to_disk` folder, as an Arrow table; errors
    start with `what` and the file name."""
    if file.is_dir():
        return _read_saved_dataset(file, what)
    if file.suffix not in PROMPT_SUFFIXES:
        raise ValueError(
            f"{what} {file}: expected a .parquet or .jsonl file (one JSON object per line) or a folder "
            f"written by datasets.save_to_disk, got suffix {file.suffix!r}"
        )
    try:
        if file.suffix == ".parquet":
            return pq.read_table(file)
        return pa_json.read_json(file)
    except (pa.ArrowException, OSError) as exc:
        # ArrowInvalid covers corrupt/truncated parquet and JSON parse errors; OSError covers
        # unreadable files (permissions, I/O errors).
        kind = (
            "parquet"
            if file.suffix == ".parquet"
            else "JSON Lines (one JSON object per line, same keys and types on every line)"
        )
        raise ValueError(f"{what} {file} could not be read as {kind}: {exc}") from exc


def _read_saved_dataset(folder: Path, what: str) -> pa.Table:
    """A folder written by `datasets.Dataset.save_to_disk`: `state.json` lists Arrow stream files."""
    if (folder / "dataset_dict.json").exists():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        raise ValueError(
            f"{what} {folder} holds a DatasetDict (splits {splits}); point data.path at one split's "
            f"folder, e.g. {folder / (splits[0] if splits else 'train')}"
        )
    state = folder / "state.json"
    if not state.exists():
        raise ValueError(
            f"{what} {folder} is a folder without state.json; expected a .parquet or .jsonl file or a "
            "folder written by datasets.save_to_disk"
        )
    try:
        files = [folder / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        tables = [pa.ipc.open_stream(pa.memory_map(str(f))).read_all() for f in files]
    except (KeyError, TypeError, json.JSONDecodeError, pa.ArrowException, OSError) as exc:
        raise ValueError(f"{what} {folder} could not be read as a datasets.save_to_disk folder: {exc}") from exc
    if not tables:
        raise ValueError(f"{what} {folder}: state.json lists no data files")
    return pa.concat_tables(tables)


def read_prompt_file(path: str | Path, columns: PromptColumns | None = None) -> list[Prompt]:
    """Read prompts from .parquet, .jsonl or a save_to_disk folder, with `columns` naming the
    prompt (or messages), answer and id columns (see `PromptColumns`).

    Every error names the file and what was expected: missing file, wrong suffix, a file that
    does not parse, missing columns, no rows, null/empty/duplicate ids, empty prompts.
    """
    columns = columns or PromptColumns()
    file = Path(path).expanduser()
    if not file.exists():
        raise FileNotFoundError(f"prompt file {file} does not exist")
    if file.is_file() and file.stat().st_size == 0:
        raise ValueError(f"prompt file {file} is empty (0 bytes): expected rows with a {columns.prompt!r} column")
    table = read_table(file)
    if table.num_rows == 0 and not table.column_names:  # a jsonl file of blank lines
        raise ValueError(f"prompt file {file} has no rows: expected rows with a {columns.prompt!r} column")
    text_column = columns.messages or columns.prompt
    id_column = columns.prompt_id or ("prompt_id" if "prompt_id" in table.column_names else None)
    answer_column = columns.answer or ("answer" if "answer" in table.column_names else None)
    missing = [
        c
        for c in (text_column, id_column, answer_column, columns.source)
        if c is not None and c not in table.column_names
    ]
    if missing:
        raise ValueError(f"prompt file {file}: missing column(s) {missing} (data.columns); it has {table.column_names}")
    if table.num_rows == 0:
        raise ValueError(f"prompt file {file} has no rows: expected at least one prompt")
    ids = _prompt_ids(file, table.column(id_column).to_pylist() if id_column else None, table.num_rows)
    answers = table.column(answer_column).to_pylist() if answer_column else [""] * len(ids)
    answers = ["" if a is None else str(a) for a in answers]
    sources = (
        [None if x is None else str(x) for x in table.column(columns.source).to_pylist()]
        if columns.source
        else [None] * len(ids)
    )
    if columns.messages:
        chats = [_messages(file, i, m) for i, m in zip(ids, table.column(columns.messages).to_pylist())]
        return [Prompt(i, "", a, messages=m, source=src) for i, a, m, src in zip(ids, answers, chats, sources)]
    texts = table.column(columns.prompt).to_pylist()
    bad = [i for i, t in zip(ids, texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise ValueError(f"prompt file {file}: empty or non-string prompt for prompt_id(s) {bad[:5]}")
    return [Prompt(i, t, a, source=src) for i, t, a, src in zip(ids, texts, answers, sources)]


def _prompt_ids(file: Path, raw_ids: list | None, rows: int) -> list[str]:
    if raw_ids is None:
        return [f"row-{n}" for n in range(rows)]
    if any(x is None for x in raw_ids):
        raise ValueError(f"prompt file {file}: prompt_id has null values (row {raw_ids.index(None)})")
    ids = [str(x) for x in raw_ids]
    if "" in ids:
        raise ValueError(f"prompt file {file}: prompt_id has empty values (row {ids.index('')})")
    if len(set(ids)) != len(ids):
        dupes = [i for i, count in Counter(ids).items() if count > 1]
        raise ValueError(f"prompt file {file}: prompt_id values are not unique (repeated: {dupes[:5]})")
    return ids


def _messages(file: Path, prompt_id: str, value) -> tuple[dict, ...]:
    ok = (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
    )
    if not ok:
        raise ValueError(
            f"prompt file {file}: prompt_id {prompt_id!r}: the messages column must hold a non-empty list "
            f"of {{role, content}} strings, got {str(value)[:200]}"
        )
    if value[-1]["role"] == "assistant":
        raise ValueError(
            f"prompt file {file}: prompt_id {prompt_id!r}: the last message is an assistant turn; a "
            "prompt ends with the turn the policy answers"
        )
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def apply_chat_template(prompts: list[Prompt], tokenizer, system_prompt: str | None = None) -> list[Prompt]:
    """Each prompt as a chat (its messages, or one user turn after an optional system turn) put
    through the tokenizer's chat template with the generation prompt: `text` is the rendered
    string, `token_ids` the template's own encoding (what the engine receives)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "data.chat_template: the model's tokenizer has no chat template (tokenizer_config.json "
            "`chat_template`); set data.chat_template: false or use a tokenizer that has one"
        )
    out = []
    for p in prompts:
        chat = list(p.messages) if p.messages else [{"role": "user", "content": p.text}]
        if system_prompt is not None and chat[0]["role"] != "system":
            chat = [{"role": "system", "content": system_prompt}, *chat]
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        out.append(
            Prompt(p.prompt_id, text, p.answer, tuple(int(t) for t in ids), messages=tuple(chat), source=p.source)
        )
    return out


def _write_task_file(rows: list[dict], path: Path) -> Path:
    try:
        return write_prompt_file(rows, path)
    except BaseException:
        # write_prompt_file renames a temp file into place; a failed write must not leave it behind.
        path.with_suffix(path.suffix + ".tmp").unlink(missing_ok=True)
        raise


def prepare_prompt_files(cfg: DataConfig, run_dir: str | Path) -> tuple[Path, Path | None]:
    """The train and held-out eval prompt files of a job (the user's `path` and `eval_path`; a
    built-in task writes both). Both built-in tasks ask the same sums; `tool_arithmetic` differs in
    how they are answered and judged."""
    if cfg.path is not None:
        return Path(cfg.path).expanduser(), Path(cfg.eval_path).expanduser() if cfg.eval_path else None
    data_dir = Path(run_dir) / "data"
    # A job's config always resolves the seed; a DataConfig used on its own gets 0, so that train
    # and eval split the operand pairs alike (an unseeded split per call would let them overlap).
    seed = 0 if cfg.seed is None else cfg.seed
    train = _write_task_file(
        arithmetic_rows(cfg.num_prompts, seed, "train", cfg.max_operand), data_dir / "train.parquet"
    )
    held_out = None
    if cfg.eval_prompts:
        held_out = _write_task_file(
            arithmetic_rows(cfg.eval_prompts, seed, "eval", cfg.max_operand), data_dir / "eval.parquet"
        )
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
