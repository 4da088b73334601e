"""`data.path` / `data.eval_path` as a list of prompt files (veRL's `data.train_files` /
`data.val_files`), read as one prompt set in the listed order: positional ids `<label>/row-<n>`,
each prompt's source its file's label, a `prompt_id` in two files refused, errors naming
`data.path[i]`; one file (a string) reads exactly as before."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_cluster.config import ConfigError, JobConfig, PromptColumns, load_config
from rlhf_cluster.data.prompt_files import file_labels, read_prompts
from rlhf_cluster.data.prompts import read_prompt_file
from rlhf_cluster.job.preflight import preflight
from tests.byo import save_chat_model

SUMS = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "4+5=", "answer": "9"}]
WORDS = [{"prompt": "Sam has 3 apples and eats one.", "answer": "2"}, {"prompt": "Two and two?", "answer": "4"},
         {"prompt": "Ten less one?", "answer": "9"}]  # fmt: skip


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.fixture
def two(tmp_path):
    return [_write(tmp_path / "sums.parquet", SUMS), _write(tmp_path / "words.jsonl", WORDS)]


def test_two_files_are_one_prompt_set_in_the_listed_order(two):
    prompts = read_prompts(two)
    assert [(p.prompt_id, p.text, p.answer, p.source) for p in prompts] == [
        ("sums/row-0", "1+2=", "3", "sums"),
        ("sums/row-1", "4+5=", "9", "sums"),
        ("words/row-0", WORDS[0]["prompt"], "2", "words"),
        ("words/row-1", WORDS[1]["prompt"], "4", "words"),
        ("words/row-2", WORDS[2]["prompt"], "9", "words"),
    ]
    assert [p.prompt_id for p in read_prompts(two[::-1])][:2] == ["words/row-0", "words/row-1"]


def test_one_file_reads_exactly_as_before(two):
    for value in (two[0], [two[0]]):
        prompts = read_prompts(value)
        assert prompts == read_prompt_file(two[0])
        assert [(p.prompt_id, p.source) for p in prompts] == [("row-0", None), ("row-1", None)]


def test_files_that_share_a_stem_are_told_apart_by_their_folder(tmp_path):
    files = [_write(tmp_path / "gsm8k" / "train.parquet", SUMS), _write(tmp_path / "math" / "train.jsonl", WORDS)]
    prompts = read_prompts(files)
    assert [p.prompt_id for p in prompts][1:3] == ["gsm8k/train/row-1", "math/train/row-0"]
    assert {p.source for p in prompts} == {"gsm8k/train", "math/train"}
    same = [tmp_path / "a" / "x" / "train.parquet", tmp_path / "b" / "x" / "train.jsonl"]
    assert file_labels(same) == ["0:train", "1:train"]


def test_ids_and_sources_from_columns_are_kept(tmp_path):
    rows = [{**r, "prompt_id": f"q{i}", "origin": "x"} for i, r in enumerate(SUMS)]
    files = [
        _write(tmp_path / "a.jsonl", rows),
        _write(tmp_path / "b.jsonl", [{**WORDS[0], "prompt_id": "w", "origin": "y"}]),
    ]
    prompts = read_prompts(files, PromptColumns(source="origin"))
    assert [(p.prompt_id, p.source) for p in prompts] == [("q0", "x"), ("q1", "x"), ("w", "y")]


def test_an_id_in_two_files_is_refused_naming_it_and_both_files(tmp_path):
    first = _write(tmp_path / "a.jsonl", [{**SUMS[0], "prompt_id": "p1"}, {**SUMS[1], "prompt_id": "p2"}])
    second = _write(tmp_path / "b.parquet", [{**WORDS[0], "prompt_id": "p2"}])
    with pytest.raises(ValueError) as info:
        read_prompts([first, second])
    message = str(info.value)
    assert message.startswith("data.path: prompt_id 'p2' is in both data.path[0]")
    assert first in message and f"data.path[1] ({second})" in message


def test_a_missing_column_names_the_file_and_its_place(two, tmp_path):
    third = _write(tmp_path / "more.jsonl", [{"question": "3+3=", "answer": "6"}])
    with pytest.raises(ValueError, match=rf"^data.path\[2\]: prompt file {third}: missing column\(s\) \['prompt'\]"):
        read_prompts([*two, third])
    first = _write(tmp_path / "held" / "sums.parquet", [{**r, "origin": "o"} for r in SUMS])
    with pytest.raises(ValueError, match=r"^data.eval_path\[1\]: prompt file \S*words.jsonl: missing .*'origin'"):
        read_prompts([first, two[1]], PromptColumns(source="origin"), field="data.eval_path")


def test_the_config_takes_a_list_and_refuses_an_empty_or_repeated_one(two):
    assert load_config(None, [f"data.path=[{two[0]}, {two[1]}]"]).data.path == two
    assert load_config(None, [f"data.path={two[0]}"]).data.path == two[0]
    with pytest.raises(ConfigError, match=r"data.path: an empty list"):
        load_config(None, ["data.path=[]"])
    with pytest.raises(ConfigError, match=r"data.eval_path\[1\]: \S+ is listed twice \(also data.eval_path\[0\]\)"):
        load_config(None, [f"data.path={two[0]}", f"data.eval_path=[{two[1]}, {two[1]}]"])


def test_preflight_names_the_missing_second_file(two, tmp_path):
    data = {"path": [two[0], str(tmp_path / "nope.parquet")], "verifier": "exact"}
    with pytest.raises(ConfigError, match=rf"data.path\[1\]: prompt file {tmp_path}/nope.parquet does not exist"):
        preflight(JobConfig.model_validate({"data": data}))
    with pytest.raises(ConfigError, match=r"data.eval_path\[0\]: prompt file \S*gone.jsonl does not exist"):
        gone = [str(tmp_path / "gone.jsonl")]
        preflight(JobConfig.model_validate({"data": {**data, "path": two, "eval_path": gone}}))
    preflight(JobConfig.model_validate({"data": {**data, "path": two}}))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_chat_model(tmp_path_factory.mktemp("chat"))


def _inputs(tmp_path, model, **data):
    from rlhf_cluster.job.inputs import prepare_inputs
    from rlhf_cluster.run.run_dir import RunDir

    cfg = JobConfig.model_validate({
        "run_dir": str(tmp_path / "run"), "model": {"path": str(model)},
        "data": {"verifier": "exact", "shuffle": False, **data}, "generation": {"probe": {"sequences": 0}},
    })  # fmt: skip
    preflight(cfg)
    return prepare_inputs(cfg, RunDir(cfg.run_dir, cfg.weights_dir, cfg.checkpoint_dir))


def test_a_job_reads_both_lists_and_evaluates_per_file(tmp_path, model, two):
    held = [_write(tmp_path / "held" / "sums.jsonl", [{"prompt": "7+1=", "answer": "8"}, SUMS[0]]),
            _write(tmp_path / "held" / "words.parquet", [{"prompt": "Three and one?", "answer": "4"}])]  # fmt: skip
    inputs = _inputs(tmp_path, model, path=two, eval_path=held)
    # "1+2=" is held out (sums.jsonl repeats it): training drops it; the rest in the listed order
    assert [p.prompt_id for p in inputs.prompts] == ["sums/row-1", "words/row-0", "words/row-1", "words/row-2"]
    assert [(p.prompt_id, p.source) for p in inputs.eval_prompts] == [
        ("sums/row-0", "sums"), ("sums/row-1", "sums"), ("words/row-0", "words"),
    ]  # fmt: skip
    record = json.loads((tmp_path / "run" / "data" / "held_out.json").read_text())
    assert record == {"held_out_ids": ["sums/row-0", "sums/row-1", "words/row-0"], "dropped_train_repeats": 1}


def test_eval_fraction_holds_out_from_the_union(tmp_path, model, two):
    inputs = _inputs(tmp_path, model, path=two, eval_fraction=0.4, seed=3)
    ids = [p.prompt_id for p in inputs.prompts] + [p.prompt_id for p in inputs.eval_prompts]
    assert sorted(ids) == sorted([f"sums/row-{n}" for n in range(2)] + [f"words/row-{n}" for n in range(3)])
    assert len(inputs.eval_prompts) == 2
    assert {p.source for p in inputs.prompts + inputs.eval_prompts} == {"sums", "words"}


def test_a_resume_whose_split_changed_is_warned_of(tmp_path, model, two, caplog):
    """Found in review: a list reordered (or a file added) on resume changes an eval_fraction split
    without a word; the job now warns that earlier held-out prompts are trained on."""
    first = _inputs(tmp_path, model, path=two, eval_fraction=0.4, seed=3)
    with caplog.at_level("WARNING", logger="rlhf_cluster.data.eval_split"):
        _inputs(tmp_path, model, path=two, eval_fraction=0.4, seed=3)  # the same list: nothing to say
        assert not caplog.records
        again = _inputs(tmp_path, model, path=two[::-1], eval_fraction=0.4, seed=3)
    moved = {p.prompt_id for p in first.eval_prompts} - {p.prompt_id for p in again.eval_prompts}
    assert moved and f"{len(moved)} of the run's 2 earlier held-out prompts" in caplog.text


def test_an_unreadable_file_in_a_list_is_an_error_of_its_kind_naming_its_place(two, monkeypatch):
    """Found in review: re-raising as `type(exc)(message)` failed for errors whose constructor takes
    more (a JSONDecodeError from a dataset folder's state.json) with a TypeError."""
    from rlhf_cluster.data import prompt_files

    def broken(*args, **kwargs):
        raise json.JSONDecodeError("Expecting value", "{", 0)

    monkeypatch.setattr(prompt_files, "read_prompt_file", broken)
    with pytest.raises(ValueError, match=r"^data.path\[0\]: Expecting value"):
        read_prompts(two, None)
