"""`data.columns` names a field of a nested column by its dotted path (`reward_model.ground_truth`),
so a parquet file written by verl's data preprocessing (chat messages in `prompt`, the answer in
`reward_model.ground_truth`, `data_source`, `extra_info`) is read as it is, by config alone; a part
that is no field, or a column that is no struct, is named with what is there."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from actors.commands.cli import app
from rlhf_cluster.config import PromptColumns
from rlhf_cluster.data.prompts import read_prompt_file
from tests.byo import save_chat_model

INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
VERL_COLUMNS = {"messages": "prompt", "answer": "reward_model.ground_truth", "prompt_id": "extra_info.index",
                "source": "data_source", "extra": ["extra_info", "reward_model.style"]}  # fmt: skip


def _verl_rows(n: int) -> list[dict]:
    """Rows as verl's examples/data_preprocess/gsm8k.py writes them."""
    return [
        {
            "data_source": "openai/gsm8k",
            "prompt": [{"role": "user", "content": f"What is {i} + {i}? {INSTRUCTION}"}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(2 * i)},
            "extra_info": {
                "split": "train",
                "index": 100 + i,
                "answer": f"{i}+{i}={2 * i} #### {2 * i}",
                "question": f"What is {i} + {i}?",
            },
        }  # fmt: skip
        for i in range(n)
    ]


def test_a_verl_parquet_file_reads_by_dotted_column_paths(tmp_path):
    data = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(_verl_rows(3)), data)
    prompts = read_prompt_file(data, PromptColumns(**VERL_COLUMNS))
    assert [p.prompt_id for p in prompts] == ["100", "101", "102"]
    assert [p.answer for p in prompts] == ["0", "2", "4"] and {p.source for p in prompts} == {"openai/gsm8k"}
    assert prompts[1].messages == ({"role": "user", "content": f"What is 1 + 1? {INSTRUCTION}"},)
    assert prompts[2].extra["extra_info"]["question"] == "What is 2 + 2?"  # a whole struct: a dict
    assert prompts[2].extra["reward_model.style"] == "rule"
    # The same rows as JSON lines: objects are nested columns too.
    lines = tmp_path / "train.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in _verl_rows(3)))
    assert [(p.prompt_id, p.answer) for p in read_prompt_file(lines, PromptColumns(**VERL_COLUMNS))] == [
        ("100", "0"), ("101", "2"), ("102", "4")]  # fmt: skip


def test_a_dotted_path_that_is_not_there_is_named_with_what_is(tmp_path):
    data = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(_verl_rows(2)), data)
    with pytest.raises(ValueError, match=r"'reward_model.truth'.*'reward_model' has no field 'truth'.*'ground_truth'"):
        read_prompt_file(data, PromptColumns(messages="prompt", answer="reward_model.truth"))
    with pytest.raises(ValueError, match=r"'ability.level'.*'ability' holds string, not a struct with a field 'level'"):
        read_prompt_file(data, PromptColumns(messages="prompt", answer="ability.level"))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['rm.ground_truth'\]"):
        read_prompt_file(data, PromptColumns(messages="prompt", answer="rm.ground_truth"))


def test_a_verl_dataset_passes_the_dry_run_by_config_alone(tmp_path):
    model = save_chat_model(tmp_path / "model")
    data = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(_verl_rows(16)), data)
    config = tmp_path / "verl.yaml"
    config.write_text(yaml.safe_dump({
        "name": "verl-data", "run_dir": str(tmp_path / "run"), "model": {"path": str(model)},
        "data": {"path": str(data), "columns": VERL_COLUMNS, "chat_template": True, "verifier": "gsm8k"},
        "generation": {"sampling": {"n": 2, "max_new_tokens": 16}},
        "learner": {"world_size": 1}, "train": {"total_steps": 2, "prompts_per_step": 2, "progress": False},
    }))  # fmt: skip
    result = CliRunner().invoke(app, ["train", str(config), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "dry run ok" in result.output and "What is 0 + 0?" in result.output  # the first prompt, templated


def test_a_ground_truth_that_is_no_string_reaches_a_verl_function_as_the_file_holds_it(tmp_path):
    from rlhf_cluster.experience.records import Rollout
    from rlhf_cluster.scoring.rewards import RuleReward, reward_contexts

    rows = _verl_rows(2)
    rows[0]["reward_model"]["ground_truth"] = ["0", "zero"]  # accepted answers, as some verl datasets list them
    rows[1]["reward_model"]["ground_truth"] = ["2", "two"]
    data = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    prompts = read_prompt_file(data, PromptColumns(**VERL_COLUMNS))
    assert prompts[0].answer == "['0', 'zero']" and prompts[0].answer_value == ["0", "zero"]
    seen = []

    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        seen.append(ground_truth)
        return float(solution_str.strip() in ground_truth)

    rollouts = [Rollout(f"s{i}", p.prompt_id, "g", [1], [2], [0.0], 0, "stop", "two") for i, p in enumerate(prompts)]
    out = RuleReward(None, reward_fn=compute_score).score(rollouts, reward_contexts(prompts))
    assert [r for r, _ in out] == [0.0, 1.0] and seen == [["0", "zero"], ["2", "two"]]
