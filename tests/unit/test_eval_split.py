"""The held-out prompts of a job on the user's data (rlhf_cluster/data/eval_split.py): disjoint from
training by content, seeded, bounded; config and preflight errors name the field."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_cluster.config import ConfigError, JobConfig
from rlhf_cluster.data.eval_split import content_key, evaluated, split_by_file, split_by_fraction
from rlhf_cluster.data.prompts import Prompt, read_prompt_file
from rlhf_cluster.job.preflight import preflight


def _prompts(n: int, repeats: int = 0) -> list[Prompt]:
    """n distinct prompts, then `repeats` of the first ones again under other ids."""
    out = [Prompt(f"p{i}", f"what is {i} + {i}?", str(2 * i)) for i in range(n)]
    return out + [Prompt(f"again{i}", out[i].text, out[i].answer) for i in range(repeats)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_fraction_split_is_disjoint_by_content_seeded_and_sized(seed):
    prompts = _prompts(40, repeats=10)
    split = split_by_fraction(prompts, 0.25, seed)
    assert {content_key(p) for p in split.train}.isdisjoint({content_key(p) for p in split.held_out})
    assert len({content_key(p) for p in split.held_out}) == 10  # a quarter of the 40 distinct prompts
    assert len(split.train) + len(split.held_out) == len(prompts)  # nothing lost, nothing on both sides
    assert [p.prompt_id for p in split_by_fraction(prompts, 0.25, seed).held_out] == [p.prompt_id for p in split.held_out]
    other = split_by_fraction(prompts, 0.25, seed + 10)
    assert {p.prompt_id for p in other.held_out} != {p.prompt_id for p in split.held_out}


def test_a_fraction_split_holds_out_at_least_one_and_never_all():
    assert len(split_by_fraction(_prompts(3), 0.01, 0).held_out) == 1
    assert len(split_by_fraction(_prompts(3), 0.99, 0).train) == 1
    with pytest.raises(ValueError, match="data.eval_fraction=0.5: the prompt file has 1 distinct"):
        split_by_fraction(_prompts(1, repeats=1), 0.5, 0)


def test_an_eval_file_drops_training_prompts_that_repeat_it():
    prompts = _prompts(10)
    held = [Prompt("e1", prompts[3].text, "6"), Prompt("e2", "a new question", "x")]
    split = split_by_file(prompts, held, "eval.parquet")
    assert split.dropped_repeats == 1 and "p3" not in {p.prompt_id for p in split.train} and split.held_out == held
    with pytest.raises(ValueError, match="data.eval_path=eval.parquet: every training prompt repeats"):
        split_by_file(prompts[:1], held[:1] + [Prompt("e3", prompts[0].text, "0")], "eval.parquet")


def test_evaluated_is_a_bounded_seeded_subset_in_file_order():
    held = _prompts(100)
    chosen = evaluated(held, 16, seed=3)
    assert len(chosen) == 16 and chosen == evaluated(held, 16, seed=3)
    ids = [int(p.prompt_id[1:]) for p in chosen]
    assert ids == sorted(ids) and ids != list(range(16))
    assert evaluated(held[:5], 16, 3) == held[:5]


def test_the_split_file_names_the_held_out_ids(tmp_path):
    split = split_by_fraction(_prompts(8), 0.5, 0)
    split.write(tmp_path / "data" / "held_out.json")
    written = json.loads((tmp_path / "data" / "held_out.json").read_text())
    assert written["held_out_ids"] == [p.prompt_id for p in split.held_out]
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["held_out.json"]  # no temp file left


def test_eval_fields_need_the_users_data_and_exclude_each_other():
    with pytest.raises(ValueError, match="data.eval_fraction holds out part of the user's prompts"):
        JobConfig.model_validate({"data": {"eval_fraction": 0.1}})
    with pytest.raises(ValueError, match="data.eval_path and data.eval_fraction both"):
        JobConfig.model_validate({"data": {"path": "x.parquet", "eval_path": "y.parquet", "eval_fraction": 0.1}})
    with pytest.raises(ValueError, match="eval_fraction"):
        JobConfig.model_validate({"data": {"path": "x.parquet", "eval_fraction": 1.0}})


def test_preflight_names_a_bad_eval_file_and_reads_it_with_the_same_columns(tmp_path):
    pq.write_table(pa.table({"question": ["a?", "b?", "c?"], "answer": ["1", "2", "3"]}), tmp_path / "train.parquet")
    pq.write_table(pa.table({"question": ["d?"], "answer": ["4"]}), tmp_path / "eval.parquet")
    data = {"path": str(tmp_path / "train.parquet"), "columns": {"prompt": "question"}, "verifier": "exact"}
    ok = JobConfig.model_validate({"data": {**data, "eval_path": str(tmp_path / "eval.parquet")}})
    preflight(ok)
    assert [p.text for p in read_prompt_file(tmp_path / "eval.parquet", ok.data.columns)] == ["d?"]
    missing = JobConfig.model_validate({"data": {**data, "eval_path": str(tmp_path / "nope.parquet")}})
    with pytest.raises(ConfigError, match=r"data.eval_path: prompt file \S*nope.parquet does not exist"):
        preflight(missing)
    one = JobConfig.model_validate({"data": {**data, "path": str(tmp_path / "eval.parquet"), "eval_fraction": 0.5}})
    with pytest.raises(ConfigError, match="data.eval_fraction=0.5: the prompt file has 1 distinct"):
        preflight(one)


def test_accuracy_per_source_from_a_source_column(tmp_path):
    from rlhf_cluster.config.inputs import PromptColumns
    from rlhf_cluster.telemetry.rollout_stats import accuracy, accuracy_by_source

    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "origin": ["easy", "hard", None]}), tmp_path / "p.parquet")
    prompts = read_prompt_file(tmp_path / "p.parquet", PromptColumns(source="origin"))
    assert [p.source for p in prompts] == ["easy", "hard", None]
    correct = {"row-0": [True, True], "row-1": [False, True], "row-2": [False, False]}
    by_source = accuracy_by_source(correct, {p.prompt_id: p.source for p in prompts})
    assert by_source == {"easy": 1.0, "hard": 0.5} and accuracy(correct) == 0.5
    assert accuracy_by_source(correct, {}) == {}
    with pytest.raises(ValueError, match=r"missing column\(s\) \['kind'\]"):
        read_prompt_file(tmp_path / "p.parquet", PromptColumns(source="kind"))
