"""Where in a JSON Lines file Arrow's read failed, as an editor numbers it: Arrow says `in row N`,
counted from 0 among the non-blank lines of one 1 MiB block, so the file is read again line by line
to find the first line that is no JSON object or whose value in the named column changes kind."""

from __future__ import annotations

import json
import re
from pathlib import Path

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
    with file.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
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
