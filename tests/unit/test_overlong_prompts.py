"""`data.overlong_prompts: drop`: prompts that leave no room for a full response are left out of
the training and held-out prompts before the job starts (veRL's `data.filter_overlong_prompts`,
slime's `--rollout-max-prompt-len`, SkyRL's `max_prompt_length`), logged once and listed in
<run_dir>/data/overlong.json; `error` (the default) stops the job as before."""

from __future__ import annotations

import json
import logging

import pytest

from rlhf_cluster.config import JobConfig
from tests.byo import save_chat_model

LONG = "Sam has many apples " * 40  # far past 64 - 16 tokens


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_chat_model(tmp_path_factory.mktemp("chat"))


def _write(path, texts: dict[str, str]):
    path.write_text("".join(json.dumps({"prompt_id": k, "prompt": v, "answer": "1"}) + "\n" for k, v in texts.items()))
    return str(path)


def _inputs(tmp_path, model, train: dict[str, str], held_out: dict[str, str] | None = None, **data):
    from rlhf_cluster.job.inputs import prepare_inputs
    from rlhf_cluster.run.run_dir import RunDir

    tmp_path.mkdir(exist_ok=True)
    if held_out is not None:
        data["eval_path"] = _write(tmp_path / "eval.jsonl", held_out)
    cfg = JobConfig.model_validate({
        "run_dir": str(tmp_path / "run"), "model": {"path": str(model)},
        "data": {"path": _write(tmp_path / "train.jsonl", train), **data},
        "generation": {"probe": {"sequences": 0}, "max_model_len": 64, "sampling": {"max_new_tokens": 16}},
    })  # fmt: skip
    return prepare_inputs(cfg, RunDir(cfg.run_dir, cfg.weights_dir, cfg.checkpoint_dir))


TRAIN = {"a": "Sam has 3 apples.", "long-1": LONG, "b": "Sam has 4 apples.", "long-2": LONG + "!"}


def test_by_default_an_overlong_prompt_stops_the_job(tmp_path, model):
    with pytest.raises(ValueError, match=r"train.jsonl: 2 prompt\(s\) longer than generation.max_model_len - "
                                         r"generation.sampling.max_new_tokens = 48 tokens \(first: 'long-1', .*"
                                         r"or set data.overlong_prompts: drop$"):
        _inputs(tmp_path, model, TRAIN)


def test_drop_leaves_them_out_logs_once_and_records_them(tmp_path, model, caplog):
    held_out = {"e1": "Sam has 5 apples.", "e-long": "Sam has apples " * 20}  # fits 64 - 16, not 64 - 40
    with caplog.at_level(logging.WARNING, logger="rlhf_cluster.job.inputs"):
        inputs = _inputs(tmp_path, model, TRAIN, held_out, overlong_prompts="drop",
                         eval_sampling={"max_new_tokens": 40})  # fmt: skip
    assert [p.prompt_id for p in inputs.prompts] == ["a", "b"]
    assert [p.prompt_id for p in inputs.eval_prompts] == ["e1"]
    logged = [r.getMessage() for r in caplog.records if "data.overlong_prompts: drop" in r.getMessage()]
    assert len(logged) == 2  # one line for the training prompts, one for the held-out
    assert "2 prompt(s) longer" in logged[0] and "first: 'long-1'" in logged[0] and "2 left" in logged[0]
    assert "data.eval_sampling.max_new_tokens = 24 tokens (first: 'e-long'" in logged[1]
    record = json.loads((tmp_path / "run" / "data" / "overlong.json").read_text())
    assert record == {
        "train": {"limit_tokens": 48, "dropped_ids": ["long-1", "long-2"]},
        "held_out": {"limit_tokens": 24, "dropped_ids": ["e-long"]},
    }


def test_drop_refuses_when_nothing_is_left(tmp_path, model):
    with pytest.raises(ValueError, match=r"2 prompt\(s\) longer .*: data.overlong_prompts: drop leaves none"):
        _inputs(tmp_path, model, {"long-1": LONG, "long-2": LONG}, overlong_prompts="drop")
    with pytest.raises(ValueError, match=r"eval.jsonl: 1 prompt\(s\) longer .*: data.overlong_prompts: drop leaves none"):
        _inputs(tmp_path / "held-out", model, {"a": "Sam has 3 apples."}, {"e": LONG}, overlong_prompts="drop")


def test_drop_with_every_prompt_fitting_records_none(tmp_path, model):
    inputs = _inputs(tmp_path, model, {"a": "Sam has 3 apples."}, overlong_prompts="drop")
    assert [p.prompt_id for p in inputs.prompts] == ["a"]
    record = json.loads((tmp_path / "run" / "data" / "overlong.json").read_text())
    assert record["train"]["dropped_ids"] == [] and record["held_out"]["dropped_ids"] == []
