"""Prompt sources: a parquet, jsonl or save_to_disk dataset read with pyarrow (columns mapped by
`data.columns`; rendered as chats by `chat_template.py`), served in a seeded order.

Built-in tasks write their prompts to parquet first and come back through this same reader,
so a user's dataset and the demo take one path.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from rlhf_cluster.config import DataConfig, PromptColumns
from rlhf_cluster.data.nested_columns import with_nested_columns
from rlhf_cluster.data.prompt_images import check_image_counts, read_images
from rlhf_cluster.data.row_names import jsonl_error, row_name
from rlhf_cluster.data.tasks import IMAGE_COLUMN, arithmetic_rows, write_prompt_file
from rlhf_cluster.data.visual_task import VISUAL_TASKS, visual_rows

# The default of `data.max_image_bytes`: an encoded image larger than this is refused.
MAX_IMAGE_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Prompt:
    """One prompt with the reference answer its verifier checks against. `token_ids`, when set
    (a chat-templated prompt), are exactly what the engine receives; otherwise it encodes `text`.
    `images`: the prompt's images as encoded bytes (PNG, JPEG, ...), in the order of their
    placeholders in the prompt; empty for a text prompt. `extra`: the row's `data.columns.extra`
    columns by name, which a custom reward function may take (`rlhf_cluster/scoring/rewards.py`)."""

    prompt_id: str
    text: str
    answer: str
    token_ids: tuple[int, ...] | None = None
    messages: tuple[dict, ...] | None = None  # a chat `messages` column, rendered by `apply_chat_template`
    # The messages column's own messages as read (no `data.system_prompt` or images-column parts
    # added; `apply_chat_template` keeps them): a batch reward function's `prompts`. None: a plain prompt.
    conversation: tuple[dict, ...] | None = None
    source: str | None = None  # where the prompt comes from (`data.columns.source`): evaluation reports per source
    images: tuple[bytes, ...] = ()  # `data.columns.images` (a visual task's `images` column)
    extra: dict[str, Any] = field(default_factory=dict)  # `data.columns.extra`, as pyarrow reads them
    # The answer column's value where it is no string (a list of accepted answers, verl's dict
    # ground truths): what a verl-style reward function gets as `ground_truth`; None: `answer`.
    answer_value: Any = None

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
        if file.suffix == ".parquet":
            raise ValueError(f"{what} {file} could not be read as parquet: {exc}") from exc
        raise ValueError(
            f"{what} {file} could not be read as JSON Lines (one JSON object per line, same keys and types on "
            f"every line): {jsonl_error(file, str(exc))}"
        ) from exc


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


def read_prompt_file(
    path: str | Path,
    columns: PromptColumns | None = None,
    *,
    max_image_bytes: int = MAX_IMAGE_BYTES,
    max_images: int | None = None,
    id_prefix: str = "",
) -> list[Prompt]:
    """Read prompts from .parquet, .jsonl or a save_to_disk folder, with `columns` naming the
    prompt (or messages), answer, id, image and extra columns (see `PromptColumns`). Without `columns`
    (a built-in task's own file), an `images` column is the prompts' images. Positional ids (no id
    column) are `<id_prefix>row-<n>` (one of several files: `rlhf_cluster/data/prompt_files.py`).

    Every error names the file and what was expected: missing file, wrong suffix, a file that
    does not parse, missing columns, no rows, null/empty/duplicate ids, empty prompts; an image
    that is missing, unreadable, over `max_image_bytes` or no image at all also names its row (its
    line in a .jsonl file, see `row_name`), as does a row of more than `max_images` images (None: any number).
    """
    file = Path(path).expanduser()
    if not file.exists():
        raise FileNotFoundError(f"prompt file {file} does not exist")
    prompt_column = (columns or PromptColumns()).prompt
    if file.is_file() and file.stat().st_size == 0:
        raise ValueError(f"prompt file {file} is empty (0 bytes): expected rows with a {prompt_column!r} column")
    table = read_table(file)
    if table.num_rows == 0 and not table.column_names:  # a jsonl file of blank lines
        raise ValueError(f"prompt file {file} has no rows: expected rows with a {prompt_column!r} column")
    if columns is None:
        columns = PromptColumns(images=IMAGE_COLUMN if IMAGE_COLUMN in table.column_names else None)
    text_column = columns.messages or columns.prompt
    in_file = table.column_names
    table = with_nested_columns(
        file, table, [text_column, columns.prompt_id, columns.answer, columns.source, columns.images, *columns.extra]
    )
    id_column = columns.prompt_id or ("prompt_id" if "prompt_id" in table.column_names else None)
    answer_column = columns.answer or ("answer" if "answer" in table.column_names else None)
    missing = [
        c
        for c in (text_column, id_column, answer_column, columns.source, columns.images, *columns.extra)
        if c is not None and c not in table.column_names
    ]
    if missing:
        raise ValueError(f"prompt file {file}: missing column(s) {missing} (data.columns); it has {in_file}")
    if table.num_rows == 0:
        raise ValueError(f"prompt file {file} has no rows: expected at least one prompt")
    ids = _prompt_ids(file, table.column(id_column).to_pylist() if id_column else None, table.num_rows, id_prefix)
    values = table.column(answer_column).to_pylist() if answer_column else [""] * len(ids)
    answers = ["" if a is None else str(a) for a in values]
    raw = [None if a is None or isinstance(a, str) else a for a in values]
    sources = (
        [None if x is None else str(x) for x in table.column(columns.source).to_pylist()]
        if columns.source
        else [None] * len(ids)
    )
    extras = _extras(table, columns.extra)
    images = read_images(file, table, columns.images, ids, max_image_bytes)
    check_image_counts(file, columns.images, ids, images, max_images)
    if columns.messages:
        chats = [_messages(file, i, m) for i, m in zip(ids, table.column(columns.messages).to_pylist())]
        _check_image_parts(file, ids, chats, images)
        return [
            Prompt(i, "", a, messages=m, source=src, images=im, extra=x, answer_value=v, conversation=m)
            for i, a, m, src, im, x, v in zip(ids, answers, chats, sources, images, extras, raw)
        ]
    texts = table.column(columns.prompt).to_pylist()
    bad = [i for i, t in zip(ids, texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise ValueError(f"prompt file {file}: empty or non-string prompt for prompt_id(s) {bad[:5]}")
    return [
        Prompt(i, t, a, source=src, images=im, extra=x, answer_value=v)
        for i, t, a, src, im, x, v in zip(ids, texts, answers, sources, images, extras, raw)
    ]


def _extras(table: pa.Table, names: list[str]) -> list[dict[str, Any]]:
    """Each row's `names` columns by name (`data.columns.extra`), as Python values."""
    values = {name: table.column(name).to_pylist() for name in dict.fromkeys(names)}
    return [{name: column[row] for name, column in values.items()} for row in range(table.num_rows)]


def _prompt_ids(file: Path, raw_ids: list | None, rows: int, prefix: str = "") -> list[str]:
    if raw_ids is None:
        return [f"{prefix}row-{n}" for n in range(rows)]
    if any(x is None for x in raw_ids):
        raise ValueError(f"prompt file {file}: prompt_id has null values ({row_name(file, raw_ids.index(None), rows)})")
    ids = [str(x) for x in raw_ids]
    if "" in ids:
        raise ValueError(f"prompt file {file}: prompt_id has empty values ({row_name(file, ids.index(''), rows)})")
    if len(set(ids)) != len(ids):
        dupes = [i for i, count in Counter(ids).items() if count > 1]
        raise ValueError(f"prompt file {file}: prompt_id values are not unique (repeated: {dupes[:5]})")
    return ids


def _messages(file: Path, prompt_id: str, value) -> tuple[dict, ...]:
    ok = (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and _content(m.get("content")) is not None
            for m in value
        )
    )
    if not ok:
        raise ValueError(
            f"prompt file {file}: prompt_id {prompt_id!r}: the messages column must hold a non-empty list "
            f"of {{role, content}} (content a string, or a list of {{type: text, text}} and {{type: image}} "
            f"parts), got {str(value)[:200]}"
        )
    if value[-1]["role"] == "assistant":
        raise ValueError(
            f"prompt file {file}: prompt_id {prompt_id!r}: the last message is an assistant turn; a "
            "prompt ends with the turn the policy answers"
        )
    return tuple({"role": m["role"], "content": _content(m["content"])} for m in value)


def _content(value) -> str | list[dict] | None:
    """A message's content: a string, or a list of text and image parts in their plain form
    (`{type: text, text}`, `{type: image}`: a columnar file gives each part every key); None
    when it is neither."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        return None
    parts: list[dict] = []
    for part in value:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image":
            parts.append({"type": "image"})
        else:
            return None
    return parts


def image_parts(chat: list[dict] | tuple[dict, ...]) -> int:
    """How many `{type: image}` parts a chat's messages hold."""
    return sum(1 for m in chat if isinstance(m["content"], list) for part in m["content"] if part["type"] == "image")


def _check_image_parts(file: Path, ids: list[str], chats: list, images: list[tuple[bytes, ...]]) -> None:
    """A messages column that places images itself places exactly the row's images."""
    for prompt_id, chat, given in zip(ids, chats, images):
        parts = image_parts(chat)
        if parts and parts != len(given):
            raise ValueError(
                f"prompt file {file}: prompt_id {prompt_id!r}: its messages have {parts} image part(s) and the "
                f"row has {len(given)} image(s) (data.columns.images); each image part takes the next image"
            )


def _write_task_file(rows: list[dict], path: Path) -> Path:
    try:
        return write_prompt_file(rows, path)
    except BaseException:
        # write_prompt_file renames a temp file into place; a failed write must not leave it behind.
        path.with_suffix(path.suffix + ".tmp").unlink(missing_ok=True)
        raise


def prepare_prompt_files(cfg: DataConfig, run_dir: str | Path) -> tuple[Path, Path | None]:
    """The train and held-out eval prompt files of a job (the user's `path` and `eval_path`; a
    built-in task writes both). Both arithmetic tasks ask the same sums; `tool_arithmetic` differs in
    how they are answered and judged. The visual tasks' files hold their images (an `images` column)."""
    if cfg.path is not None:  # a list of files: `job_prompt_files` (rlhf_cluster/data/prompt_files.py)
        if not isinstance(cfg.path, str) or isinstance(cfg.eval_path, list):
            raise ValueError("data.path / data.eval_path: a list of files is read by job_prompt_files")
        return Path(cfg.path).expanduser(), Path(cfg.eval_path).expanduser() if cfg.eval_path else None
    data_dir = Path(run_dir) / "data"
    train = _write_task_file(task_rows(cfg, cfg.num_prompts, "train"), data_dir / "train.parquet")
    held_out = None
    if cfg.eval_prompts:
        held_out = _write_task_file(task_rows(cfg, cfg.eval_prompts, "eval"), data_dir / "eval.parquet")
    return train, held_out


def task_rows(cfg: DataConfig, num: int, split: str) -> list[dict]:
    """`num` rows of the built-in task `cfg.task` for `split` (train or eval), as its file holds them."""
    # A job's config always resolves the seed; a DataConfig used on its own gets 0, so that train
    # and eval split the operand pairs alike (an unseeded split per call would let them overlap).
    seed = 0 if cfg.seed is None else cfg.seed
    if cfg.task in VISUAL_TASKS:
        assert cfg.task is not None
        return visual_rows(cfg.task, num, seed, split, cfg.image_size, cfg.max_dots)
    return arithmetic_rows(num, seed, split, cfg.max_operand)


def task_prompts(cfg: DataConfig, num: int, split: str = "train") -> list[Prompt]:
    """`task_rows` as prompts, images included: what reading the task's file gives (the dry run's
    first prompt, without writing the file)."""
    return [
        Prompt(r["prompt_id"], r["prompt"], r["answer"], images=tuple(r.get(IMAGE_COLUMN, ())))
        for r in task_rows(cfg, num, split)
    ]


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

    def find(self, prompt_id: str) -> Prompt | None:
        """The source's prompt of `prompt_id` (None: not one of its prompts)."""
        if not hasattr(self, "_by_id"):
            self._by_id = {p.prompt_id: p for p in self._prompts}
        return self._by_id.get(prompt_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._epoch_order()
