"""Per-row messages of the three data readers (prompts, preferences, SFT) name the row as the user finds
it: `line N` of a .jsonl file as an editor numbers it (from 1, blank lines counted, though Arrow skips
them), `row N` (from 1) of a parquet file; not the table's index counted from 0."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rlhf_cluster.config import PromptColumns
from rlhf_cluster.data.preferences import read_preference_file
from rlhf_cluster.data.prompts import read_prompt_file
from rlhf_cluster.data.sft import read_sft_file

PAIR = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}
TURNS = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
NO_ANSWER = {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}


def _jsonl(path, lines, newline="\n"):
    """`lines` (dicts, or "" for a blank line, "  \\t" for one of spaces) written as a .jsonl file."""
    path.write_bytes(newline.join(x if isinstance(x, str) else json.dumps(x) for x in lines).encode() + b"\n")
    return path


def _refusal(read, path, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as caught:
        read(path, *args, **kwargs)
    return str(caught.value)


# A blank line, a line of spaces, then the bad row is the file's 5th line but Arrow's row 2.
@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_preference_jsonl_names_the_editors_line(tmp_path, newline):
    path = _jsonl(tmp_path / "p.jsonl", ["", PAIR, "  \t", PAIR, dict(PAIR, rejected="2")], newline)
    message = _refusal(read_preference_file, path)
    assert message == f"preference file {path}, line 5: chosen and rejected are the same text"


def test_preference_parquet_names_the_row_from_1(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([dict(PAIR, margin=0.0), dict(PAIR, margin=1.0), dict(PAIR, margin=-1.0)]), path)
    assert _refusal(read_preference_file, path) == f"preference file {path}, row 3: margin must be a number >= 0, got -1.0"


def test_sft_jsonl_and_parquet(tmp_path):
    path = _jsonl(tmp_path / "s.jsonl", [TURNS, "", "", TURNS, NO_ANSWER, TURNS])
    assert _refusal(read_sft_file, path) == f"SFT file {path}, line 5: no assistant message, so nothing to learn"
    broken = _jsonl(tmp_path / "m.jsonl", ["", {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}])
    assert _refusal(read_sft_file, broken).startswith(f"SFT file {broken}, line 2, message 1: expected")
    table = tmp_path / "s.parquet"
    pq.write_table(pa.Table.from_pylist([TURNS, NO_ANSWER]), table)
    assert _refusal(read_sft_file, table) == f"SFT file {table}, row 2: no assistant message, so nothing to learn"


def test_prompt_ids_jsonl_and_parquet(tmp_path):
    rows = [{"prompt_id": "a", "prompt": "x"}, "", {"prompt_id": "", "prompt": "y"}]
    path = _jsonl(tmp_path / "p.jsonl", rows)
    assert _refusal(read_prompt_file, path) == f"prompt file {path}: prompt_id has empty values (line 3)"
    path = _jsonl(tmp_path / "n.jsonl", ["", "", {"prompt_id": "a", "prompt": "x"}, {"prompt_id": None, "prompt": "y"}])
    assert _refusal(read_prompt_file, path) == f"prompt file {path}: prompt_id has null values (line 4)"
    table = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt_id": ["a", "b", None], "prompt": ["x", "y", "z"]}), table)
    assert _refusal(read_prompt_file, table) == f"prompt file {table}: prompt_id has null values (row 3)"


def test_prompt_images_jsonl_and_parquet(tmp_path):
    columns = PromptColumns(images="image")
    rows = [{"prompt_id": "a", "prompt": "x", "image": []}, "", {"prompt_id": "b", "prompt": "y", "image": ["gone.png"]}]
    path = _jsonl(tmp_path / "p.jsonl", rows)
    assert f"prompt file {path}: line 3 (prompt_id 'b'), column 'image': " in _refusal(read_prompt_file, path, columns)
    Image.new("RGB", (28, 28), (200, 0, 0)).save(tmp_path / "red.png")
    two = ["red.png", "red.png"]
    many = [{"prompt_id": "a", "prompt": "x", "image": []}, "\t", {"prompt_id": "b", "prompt": "y", "image": two}]
    path = _jsonl(tmp_path / "many.jsonl", many)
    message = _refusal(read_prompt_file, path, columns, max_images=1)
    assert message.startswith(f"prompt file {path}: line 3 (prompt_id 'b'), column 'image': 2 images, more than")
    table = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt_id": ["a", "b"], "prompt": ["x", "y"], "image": [[], ["gone.png"]]}), table)
    assert f"prompt file {table}: row 2 (prompt_id 'b'), column 'image': " in _refusal(read_prompt_file, table, columns)


def test_two_objects_on_one_line_are_counted_as_rows(tmp_path):
    """Arrow reads two objects on one line as two rows: the lines are then not the rows, and the
    message says how it counted."""
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(PAIR) + " " + json.dumps(PAIR) + "\n\n" + json.dumps(dict(PAIR, chosen="")) + "\n")
    message = _refusal(read_preference_file, path)
    assert message.startswith(f"preference file {path}, row 3 (from 1, blank lines not counted): chosen must be")
