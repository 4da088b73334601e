"""A .jsonl data file Arrow cannot read is refused naming the line an editor shows (counted from 1,
blank lines included, anywhere in the file), not Arrow's `in row N` (counted from 0 among the
non-blank lines of one 1 MiB block)."""

from __future__ import annotations

import json

import pytest

from rlhf_cluster.data.preferences import read_preference_file
from rlhf_cluster.data.prompts import read_table

GOOD = json.dumps({"prompt": "a", "answer": "1", "messages": [{"role": "user", "content": "x"}]})


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ('{"prompt": "b", "answer": 2}', "line 2: JSON parse error: Column(/answer) changed from string to number"),
        ('{"prompt": "b" "answer": "2"}', "line 2: JSON parse error: Missing a comma"),
        ("[1, 2]", "line 2: JSON parse error: Column() changed from object to array"),
        ('{"prompt": "b", "answer": "2"} junk', "line 2: JSON parse error: Invalid value."),
        (
            '{"prompt": "b", "answer": "2", "messages": [{"role": "user", "content": [1]}]}',
            "line 2: JSON parse error: Column(/messages/[]/content) changed from string to array",
        ),
    ],
    ids=["type", "syntax", "not-an-object", "trailing", "nested-type"],
)
def test_a_bad_second_line_is_named_line_2(tmp_path, bad, expected):
    file = tmp_path / "prompts.jsonl"
    file.write_text(f"{GOOD}\n{bad}\n{GOOD}\n")
    with pytest.raises(ValueError) as caught:
        read_table(file, "prompt file")
    message = str(caught.value)
    assert message.startswith(f"prompt file {file} could not be read as JSON Lines") and f"line): {expected}" in message
    assert "in row" not in message


def test_blank_lines_and_later_blocks_count(tmp_path):
    file = tmp_path / "pairs.jsonl"
    pair = json.dumps({"prompt": "p" * 100, "chosen": "c", "rejected": "r"})
    lines = ["", pair, ""] + [pair] * 20_000 + ['{"prompt": 1, "chosen": "c", "rejected": "r"}', pair]
    file.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"line 20004: JSON parse error: Column\(/prompt\) changed from string"):
        read_preference_file(file)
