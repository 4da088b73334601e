"""The name a user finds a data file's row by, for per-row messages: `line N` of a JSON Lines file
(as an editor numbers it, from 1, blank lines included), `row N` (from 1) of a parquet file or a
save_to_disk folder.

Arrow reads a JSON Lines file skipping lines of only spaces and tabs, so a table's row index is not
its line: the file is read again, only when a message needs the name, to find the line that holds
the row. Lines end as Arrow ends them (`\\n`, `\\r\\n` or a lone `\\r`)."""

from __future__ import annotations

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
    with file.open(encoding="utf-8", errors="replace", newline=None) as text:
        return [number for number, line in enumerate(text, 1) if line.strip(_ARROW_BLANK)]
