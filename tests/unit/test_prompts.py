import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_cluster.config import DataConfig
from rlhf_cluster.data.prompts import Prompt, PromptSource, prepare_prompt_files, read_prompt_file
from rlhf_cluster.data.tasks import arithmetic_rows, combine_reward, verify_arithmetic, write_prompt_file
from rlhf_cluster.data.verifiers import REWARD_WEIGHTS


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [
    {"prompt_id": "a", "prompt": "1+2=", "answer": "3"},
    {"prompt_id": "b", "prompt": "4+5=", "answer": "9"},
    {"prompt_id": "c", "prompt": "10+1=", "answer": "11"},
]


def _refusal(path, *columns, error: type[Exception] = ValueError) -> str:
    """The message of the `error` `read_prompt_file(path, *columns)` raises, checked to name the file."""
    with pytest.raises(error) as info:
        read_prompt_file(path, *columns)
    assert str(path) in str(info.value)
    return str(info.value)


# ---- read_prompt_file -------------------------------------------------------------------------
def test_read_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    prompts = read_prompt_file(path)
    assert prompts == [Prompt("a", "1+2=", "3"), Prompt("b", "4+5=", "9"), Prompt("c", "10+1=", "11")]


def test_read_jsonl(tmp_path):
    prompts = read_prompt_file(_jsonl(tmp_path / "p.jsonl", ROWS))
    assert [p.prompt_id for p in prompts] == ["a", "b", "c"]
    assert prompts[2].text == "10+1=" and prompts[2].answer == "11"


def test_read_without_answer_column(tmp_path):
    rows = [{"prompt_id": 7, "prompt": "hello"}]
    prompts = read_prompt_file(_jsonl(tmp_path / "p.jsonl", rows))
    assert prompts == [Prompt("7", "hello", "")]


def test_write_prompt_file_round_trip(tmp_path):
    path = write_prompt_file(ROWS, tmp_path / "d" / "x.parquet")
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.parquet"]
    assert [p.answer for p in read_prompt_file(path)] == ["3", "9", "11"]


@pytest.mark.parametrize("drop", ["prompt_id", "prompt"])
def test_missing_column_names_file_and_column(tmp_path, drop):
    """A column the reader needs (the prompt, or an id column the config names) must be there."""
    from rlhf_cluster.config import PromptColumns

    path = _jsonl(tmp_path / "p.jsonl", [{k: v for k, v in r.items() if k != drop} for r in ROWS])
    assert drop in _refusal(path, PromptColumns(prompt_id="prompt_id"))


def test_duplicate_ids_rejected(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS + [dict(ROWS[0], prompt="other")]), path)
    assert "unique" in _refusal(path)


@pytest.mark.parametrize("bad", ["", None])
def test_empty_prompt_rejected(tmp_path, bad):
    path = _jsonl(tmp_path / "p.jsonl", ROWS[:2] + [dict(ROWS[2], prompt=bad)])
    assert "['c']" in _refusal(path)


def test_null_prompt_id_rejected(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt_id": ["a", None], "prompt": ["x", "y"]}), path)
    with pytest.raises(ValueError, match="prompt_id"):
        read_prompt_file(path)


def test_wrong_suffix_rejected(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt_id,prompt\na,b\n")
    _refusal(path)


def test_missing_file(tmp_path):
    path = tmp_path / "none.parquet"
    _refusal(path, error=FileNotFoundError)


def test_unparseable_file_names_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("{not json\n")
    _refusal(path)


# ---- PromptSource -----------------------------------------------------------------------------
def _prompts(n=10):
    return [Prompt(f"p{i}", f"{i}+0=", str(i)) for i in range(n)]


def _draw(src, k):
    return [src.next_prompt().prompt_id for _ in range(k)]


def test_source_covers_every_prompt_once_per_epoch():
    src = PromptSource(_prompts(10), seed=3)
    for epoch in range(3):
        ids = _draw(src, 10)
        assert sorted(ids) == sorted(f"p{i}" for i in range(10)), epoch
    assert src.epoch == 2


def test_source_is_seeded_and_deterministic():
    a = _draw(PromptSource(_prompts(20), seed=5), 45)
    b = _draw(PromptSource(_prompts(20), seed=5), 45)
    c = _draw(PromptSource(_prompts(20), seed=6), 45)
    assert a == b
    assert a != c
    assert a[:20] != [f"p{i}" for i in range(20)]  # shuffled
    assert a[:20] != a[20:40]  # a new order each epoch


def test_source_without_shuffle_is_file_order():
    assert _draw(PromptSource(_prompts(4), seed=9, shuffle=False), 8) == ["p0", "p1", "p2", "p3"] * 2


@pytest.mark.parametrize("consumed", [0, 3, 7, 7 * 2, 7 * 2 + 5])
def test_source_resume_is_exact(consumed):
    reference = PromptSource(_prompts(7), seed=11)
    expected = _draw(reference, consumed + 12)[consumed:]
    src = PromptSource(_prompts(7), seed=11)
    _draw(src, consumed)
    state = json.loads(json.dumps(src.state_dict()))  # checkpoints are plain data
    resumed = PromptSource(_prompts(7), seed=11)
    _draw(resumed, 2)  # whatever it did before is overwritten
    resumed.load_state_dict(state)
    assert _draw(resumed, 12) == expected


def test_source_needs_prompts():
    with pytest.raises(ValueError):
        PromptSource([])


# ---- built-in task ----------------------------------------------------------------------------
def test_prepare_prompt_files(tmp_path):
    cfg = DataConfig(num_prompts=50, eval_prompts=10, seed=4)
    train, held_out = prepare_prompt_files(cfg, tmp_path)
    assert train == tmp_path / "data" / "train.parquet"
    assert held_out == tmp_path / "data" / "eval.parquet"
    tr, ev = read_prompt_file(train), read_prompt_file(held_out)
    assert len(tr) == 50 and len(ev) == 10
    assert not {p.prompt_id for p in tr} & {p.prompt_id for p in ev}
    for p in tr + ev:
        a, b = p.text.removesuffix("=").split("+")
        assert int(a) + int(b) == int(p.answer)
    assert pq.read_schema(train).names == ["prompt_id", "prompt", "answer"]
    # deterministic in the seed
    again = read_prompt_file(prepare_prompt_files(cfg, tmp_path / "again")[0])
    assert again == tr


def test_prepare_prompt_files_no_eval_and_user_path(tmp_path):
    train, held_out = prepare_prompt_files(DataConfig(num_prompts=5, eval_prompts=0), tmp_path)
    assert held_out is None and len(read_prompt_file(train)) == 5
    user = tmp_path / "mine.jsonl"
    assert prepare_prompt_files(DataConfig(task=None, path=str(user)), tmp_path / "x") == (user, None)
    assert not (tmp_path / "x").exists()


def test_eval_prompts_are_held_out():
    train = {r["prompt"] for r in arithmetic_rows(2048, 0, "train")}
    held_out = [r["prompt"] for r in arithmetic_rows(64, 0, "eval")]
    assert not [p for p in held_out if p in train]


@pytest.mark.parametrize(
    "response,answer,correct,digits",
    [
        ("19", "19", 1.0, 1.0),
        ("  19\n", "19", 1.0, 1.0),
        ("18", "19", 0.0, 1.0),
        ("019", "19", 0.0, 1.0),
        ("19 20", "19", 0.0, 1.0),
        ("1a", "19", 0.0, 0.5),
        ("ab+c", "5", 0.0, 0.0),
        ("", "19", 0.0, 0.0),
        ("   ", "19", 0.0, 0.0),
        ("1 9", "19", 0.0, 1.0),
        ("abc", "abc", 0.0, 0.0),  # not a number: never correct
    ],
)
def test_verify_arithmetic(response, answer, correct, digits):
    got = verify_arithmetic(response, answer)
    assert set(got) == {"correct", "digits"}
    assert got["correct"] == correct
    assert got["digits"] == pytest.approx(digits)


def test_combine_reward():
    w = REWARD_WEIGHTS["arithmetic"]
    assert combine_reward({"correct": 1.0, "digits": 1.0}, w) == pytest.approx(1.2)
    assert combine_reward({"correct": 0.0, "digits": 0.5}, w) == pytest.approx(0.1)
    assert combine_reward({"correct": 1.0, "other": 100.0}, w) == pytest.approx(1.0)
    assert combine_reward({}, w) == 0.0
    assert isinstance(combine_reward({"correct": 1}, {"correct": 2}), float)


def test_arithmetic_rows_deterministic_and_correct():
    rows = arithmetic_rows(30, 7, "train")
    assert rows == arithmetic_rows(30, 7, "train")
    assert rows != arithmetic_rows(30, 8, "train")
    assert Counter(r["prompt_id"] for r in rows).most_common(1)[0][1] == 1
    assert all(r["prompt"].endswith("=") for r in rows)


# ---- a user's dataset: mapped columns, derived ids, chat messages, save_to_disk folders ----
def test_columns_are_mapped_and_ids_derived(tmp_path):
    from rlhf_cluster.config import PromptColumns

    path = tmp_path / "gsm.parquet"
    pq.write_table(pa.table({"question": ["What is 2+2?", "What is 3+3?"], "solution": ["so 4\n#### 4", "#### 6"]}), path)
    prompts = read_prompt_file(path, PromptColumns(prompt="question", answer="solution"))
    assert prompts == [Prompt("row-0", "What is 2+2?", "so 4\n#### 4"), Prompt("row-1", "What is 3+3?", "#### 6")]
    # Unnamed id/answer columns are taken when the file has them under their usual names.
    assert read_prompt_file(_jsonl(tmp_path / "p.jsonl", ROWS))[0].prompt_id == ROWS[0]["prompt_id"]
    no_answer = tmp_path / "q.jsonl"
    _jsonl(no_answer, [{"prompt": "hi"}])
    assert read_prompt_file(no_answer) == [Prompt("row-0", "hi", "")]


class _ChatML:
    """The two calls `apply_chat_template` makes of a tokenizer, rendering ChatML."""

    chat_template = "chatml"

    def apply_chat_template(self, chat, tokenize, add_generation_prompt):
        text = "".join(f"<{m['role']}>{m['content']}</>" for m in chat) + ("<assistant>" if add_generation_prompt else "")
        return [ord(c) for c in text] if tokenize else text

    def __call__(self, text):
        raise AssertionError("a templated prompt is never re-tokenised from its text")


def test_chat_template_renders_messages_and_user_turns(tmp_path):
    from rlhf_cluster.config import PromptColumns
    from rlhf_cluster.data.chat_template import apply_chat_template

    path = _jsonl(tmp_path / "chat.jsonl", [
        {"id": "a", "messages": [{"role": "user", "content": "2+2?"}], "answer": "4"},
        {"id": "b", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "3+3?"}],
         "answer": "6"},
    ])
    prompts = read_prompt_file(path, PromptColumns(messages="messages", prompt_id="id"))
    tok = _ChatML()
    rendered = apply_chat_template(prompts, tok, system_prompt="think")
    assert rendered[0].text == "<system>think</><user>2+2?</><assistant>"
    assert rendered[1].text == "<system>be brief</><user>3+3?</><assistant>"  # its own system turn is kept
    assert all(p.encode(tok) == [ord(c) for c in p.text] for p in rendered)
    plain = apply_chat_template([Prompt("c", "1+1=", "2")], tok)
    assert plain[0].text == "<user>1+1=</><assistant>" and plain[0].answer == "2"


def test_a_save_to_disk_folder_is_read(tmp_path):
    import datasets  # a dev dependency (pyproject)

    from rlhf_cluster.config import PromptColumns

    ds = datasets.Dataset.from_dict({"question": [f"q{i}" for i in range(5)], "answer": [f"#### {i}" for i in range(5)]})
    ds.save_to_disk(str(tmp_path / "ds"))
    prompts = read_prompt_file(tmp_path / "ds", PromptColumns(prompt="question"))
    assert [p.text for p in prompts] == [f"q{i}" for i in range(5)]
    assert prompts[3].answer == "#### 3" and prompts[3].prompt_id == "row-3"
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="DatasetDict"):
        read_prompt_file(tmp_path / "dd")
    assert len(read_prompt_file(tmp_path / "dd" / "train", PromptColumns(prompt="question"))) == 5
