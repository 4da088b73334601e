"""The name a user finds a data file's row by, for per-row messages: `line N` of a JSON Lines file
(as an editor numbers it, from 1, blank lines included), `row N` (from 1) of a parquet file or a
save_to_disk folder.

Arrow reads a JSON Lines file skipping lines of only spaces and tabs, so a table's row index is not
its line: the file is read again, only when a message needs the name, to find the line that holds
the row. Lines end as Arrow ends them (`\\n`, `\\r\\n` or a lone `\\r`).

The same reading names the line where Arrow failed to read a JSON Lines file at all (`jsonl_error`):
Arrow says `in row N`, counted from 0 among the non-blank lines of one 1 MiB block."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

JSON_LINES_SUFFIXES = (".jsonl", ".json")
_ARROW_BLANK = " \t\r\n"  # what Arrow's JSON reader skips as whitespace


def row_name(file: Path, index: int, rows: int) -> str:
    """Row `index` (from 0) of the `rows` rows read from `file`, as the user finds it: `line N` for a
    JSON Lines file, `row N` (from 1) otherwise. Where the file's non-blank lines are not its rows
    one for one (two objects on one line), `row N (from 1, blank lines not counted)`."""
    if not (file.is_file() and file.suffix in JSON_LINES_SUFFIXES):
        return f"row {index + 1}"
    lines = _non_blank_lines(file)
    if len(lines) == rows and 0 <= index < rows:
        return f"line {lines[index]}"
    return f"row {index + 1} (from 1, blank lines not counted)"


def _non_blank_lines(file: Path) -> list[int]:
    """The numbers (from 1) of the file's lines that hold more than Arrow's whitespace; universal
    newlines end a line at `\\n`, `\\r\\n` or a lone `\\r`, as Arrow does."""
    return [number for number, line in _lines(file) if line.strip(_ARROW_BLANK)]


def _lines(file: Path) -> Iterator[tuple[int, str]]:
    """The file's lines with their numbers (from 1), ended at `\\n`, `\\r\\n` or a lone `\\r`; bytes
    that are no UTF-8 kept as surrogates (`_offending_line` reads them back as bytes)."""
    with file.open(encoding="utf-8", errors="surrogateescape", newline=None) as text:
        yield from enumerate(text, 1)


_ARROW_ROW = re.compile(r"\s*in row \d+$")
_ARROW_COLUMN = re.compile(r"Column\(([^)]*)\) changed from")
_JSON_KINDS = ((bool, "boolean"), ((int, float), "number"), (str, "string"), (list, "array"), (dict, "object"))


def jsonl_error(file: Path, message: str) -> str:
    """Arrow's JSON error with its `in row N` (counted from 0 among the non-blank lines of one 1 MiB
    block) replaced by the line of the file an editor shows, found by reading the file line by line."""
    column = _ARROW_COLUMN.search(message)
    line = _offending_line(file, [p for p in column.group(1).split("/") if p] if column else None)
    return message if line is None else f"line {line}: {_ARROW_ROW.sub('', message)}"


def _offending_line(file: Path, path: list[str] | None) -> int | None:
    """The first line (from 1) that is no JSON object, or, with `path` (Arrow's column, `[]` for a
    list's items), whose value there is of another JSON kind than on the first line that has one."""
    first = None
    for number, line in _lines(file):
        if not line.strip(_ARROW_BLANK):
            continue
        try:
            row = json.loads(line.encode("utf-8", "surrogateescape"))  # bytes that are no UTF-8: refused here
        except ValueError:  # UnicodeDecodeError included
            return number
        if not isinstance(row, dict):
            return number
        for kind in _kinds_at(row, path) if path is not None else ():
            first = first or kind
            if kind != first:
                return number
    return None


def _kinds_at(value, path: list[str]):
    """The JSON kinds (string, number, ...) of the values at `path` in `value`; null has none."""
    if not path:
        yield from [name for types, name in _JSON_KINDS if isinstance(value, types)][:1]  # a bool is no number
        return
    head, rest = path[0], path[1:]
    if head == "[]" and isinstance(value, list):
        for item in value:
            yield from _kinds_at(item, rest)
    elif isinstance(value, dict) and head in value:
        yield from _kinds_at(value[head], rest)
