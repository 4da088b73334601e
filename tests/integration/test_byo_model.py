"""Bring your own model and data, by config alone, through the CLI: a Qwen2 folder saved with
`save_pretrained` (ChatML chat template) and a GSM8K-format parquet with its own column names,
prompts put through the chat template, responses judged by the gsm8k verifier. The engine must
receive exactly the tokenizer's chat-template encoding of every prompt. A quarter of the file is
held out (`data.eval_fraction`), evaluated every 2 steps, and never trained on. The job runs one
epoch over the rest (`train.total_epochs`, veRL's `trainer.total_epochs`): its steps are counted at
its start from the prompts left to train on."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import yaml
from transformers import AutoTokenizer
from typer.testing import CliRunner

from actors.commands.cli import app
from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.run.scored_log import ScoredLog
from tests.byo import gsm8k_rows, save_chat_model, write_gsm8k_parquet

SYSTEM = "Solve the problem. End with #### and the number."


def test_hf_folder_and_gsm8k_parquet_train_by_config_alone(ray_cluster, tmp_path):
    model = save_chat_model(tmp_path / "my-qwen2")
    data = write_gsm8k_parquet(tmp_path / "gsm8k.parquet", count=64)
    table = pq.read_table(data)  # a source column: evaluation reports accuracy per source
    pq.write_table(table.append_column("level", pa.array(["easy" if i % 2 else "hard" for i in range(table.num_rows)])), data)
    run_dir = tmp_path / "run"
    config = tmp_path / "byo.yaml"
    config.write_text(yaml.safe_dump({
        "name": "byo", "run_dir": str(run_dir),
        "model": {"path": str(model)},
        "data": {"path": str(data), "columns": {"prompt": "question", "answer": "answer", "source": "level"},
                 "chat_template": True,
                 "system_prompt": SYSTEM, "verifier": "gsm8k", "eval_fraction": 0.25, "eval_every_steps": 2,
                 "eval_prompts": 4, "eval_samples": 2, "eval_pass_k": [1, 2]},
        "generation": {"sampling": {"n": 4, "max_new_tokens": 16}},
        "algorithm": {"preset": "grpo"},
        "learner": {"world_size": 1, "lr": 1e-4},
        # Every scored group kept (`record_rollouts`): the checks below read them all, not what is left untrained.
        "train": {"total_epochs": 1, "prompts_per_step": 12, "progress": False, "record_rollouts": True},
        "checkpoint": {"every_steps": 1},
    }))

    # The dry run in this process (the CLI's own code, without a second interpreter importing it all).
    dry = CliRunner().invoke(app, ["train", str(config), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    # The dry run counts the epoch as the start will (checked below against the run's own split).
    counted = re.search(r"prompts: (\d+) training, (\d+) held out, 4 of them evaluated", dry.stdout)
    assert counted is not None, dry.stdout
    assert f"dry run ok: byo, {int(counted[1]) // 12} steps (train.total_epochs=1)" in dry.stdout, dry.stdout
    tokenizer = AutoTokenizer.from_pretrained(model)
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": gsm8k_rows(1)[0]["question"]}]
    rendered = tokenizer.apply_chat_template(first, tokenize=False, add_generation_prompt=True)
    assert json.dumps(rendered) in dry.stdout, dry.stdout  # the first prompt as the engine will see it
    assert f"{len(tokenizer(rendered)['input_ids'])} tokens" in dry.stdout, dry.stdout
    # The learner's memory plan for this model (on an 80 GiB GPU where the machine has none).
    assert "memory plan of each learner rank on an 80 GiB GPU (none here), 1 rank(s): checkpointing off" in dry.stdout

    # The run too, on this session's Ray (the command's ray.init and ray.shutdown skipped): a second
    # interpreter joining the cluster as a new driver is ~8 s of a 2-core machine.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray, "init", lambda *a, **k: None)
        patch.setattr(ray, "shutdown", lambda *a, **k: None)
        out = CliRunner().invoke(app, ["train", str(config), "--address", ray.get_runtime_context().gcs_address])
    assert out.exit_code == 0, (out.output[-4000:], out.exception)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    held_ids = json.loads((run_dir / "data" / "held_out.json").read_text())["held_out_ids"]
    epoch = (64 - len(held_ids)) // 12  # the steps of one epoch: whole steps of the prompts left to train on
    assert epoch >= 3, epoch  # (a periodic evaluation, every 2 steps, before the last step's)
    assert (int(counted[1]), int(counted[2])) == (64 - len(held_ids), len(held_ids))  # the dry run's count
    assert [r["weight_version"] for r in rows] == list(range(1, epoch + 1))
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["total_steps"] == epoch  # as it ran

    # Every scored group: its prompt ids are the chat template's encoding of its row.
    questions = {f"row-{i}": r["question"] for i, r in enumerate(gsm8k_rows(64))}
    groups = ScoredLog(run_dir / RunDir.SCORED_LOG).since(0)
    assert groups, "no scored group left in the log"
    for _fate, samples in groups:
        for s in samples:
            chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": questions[s.prompt_id]}]
            expected = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)["input_ids"]
            assert list(s.prompt_ids) == list(expected), s.prompt_id
            assert "correct" in s.reward_components  # the gsm8k verifier scored it

    # The held-out quarter: written down, evaluated every 2 steps and at the end, never trained on
    # (by content: the file repeats some questions under other row ids).
    held_questions = {questions[i] for i in held_ids}
    assert len(held_questions) == -(-len(set(questions.values())) // 4)
    trained = {questions[s.prompt_id] for _fate, samples in groups for s in samples}
    assert trained and trained.isdisjoint(held_questions)
    assert {"eval_accuracy", "eval_sampled_accuracy", "eval_pass@1", "eval_pass@2"} <= set(rows[1]), rows[1]
    assert all(0.0 <= rows[1][k] <= 1.0 for k in ("eval_accuracy", "eval_pass@2"))
    per_source = {k.removeprefix("eval_accuracy/") for k in rows[1] if k.startswith("eval_accuracy/")}
    assert per_source and per_source <= {"easy", "hard"}, rows[1]
    assert "eval_reward_mean" in rows[1] and "eval_accuracy" not in rows[0]
    assert (run_dir / "eval.json").is_file()
