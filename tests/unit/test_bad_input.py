"""Bad input fails early with a message that names the culprit (field path or file), and leaves no
half-written file behind.

One table: each case builds its bad input under tmp_path and returns the action that must fail,
the exception type and the strings the message must contain.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from rlhf_cluster.config import ConfigError, DataConfig, PromptColumns, load_config
from rlhf_cluster.data import tasks
from rlhf_cluster.data.chat_template import apply_chat_template
from rlhf_cluster.data.prompts import Prompt, prepare_prompt_files, read_prompt_file
from rlhf_cluster.job.preflight import preflight
from rlhf_cluster.job.validation import validate_model_dir
from rlhf_cluster.scoring.rewards import RuleReward

REPO = Path(__file__).resolve().parents[2]
ROWS = [{"prompt_id": "a", "prompt": "1+2=", "answer": "3"}, {"prompt_id": "b", "prompt": "4+5=", "answer": "9"}]


def _yaml(tmp: Path, text: str) -> Path:
    path = tmp / "job.yaml"
    path.write_text(text)
    return path


def _write(tmp: Path, name: str, data: str | bytes) -> Path:
    path = tmp / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _jsonl(tmp: Path, rows: list[dict], name: str = "prompts.jsonl") -> Path:
    path = tmp / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _parquet(tmp: Path, table: pa.Table, name: str = "prompts.parquet") -> Path:
    path = tmp / name
    pq.write_table(table, path)
    return path


def _model_dir(tmp: Path, drop: tuple[str, ...] = (), **files: str | bytes) -> Path:
    folder = tmp / "model"
    folder.mkdir()
    contents: dict[str, str | bytes] = {
        "config.json": json.dumps({"model_type": "qwen2"}),
        "tokenizer.json": "{}",
        "tokenizer_config.json": "{}",
        "model.safetensors": b"\0" * 16,
    }
    contents.update({k.replace("__", "."): v for k, v in files.items()})
    for name, data in contents.items():
        if name not in drop:
            (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return folder


def _preflight(*overrides: str) -> list[str]:
    return preflight(load_config(None, list(overrides)))


def _dry_run(*overrides: str) -> None:
    from actors.commands.cli import app

    args = ["train", str(REPO / "configs" / "demo.yaml"), "--dry-run"]
    for item in overrides:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        raise SystemExit(result.output)


def _failing_write(monkeypatch, run_dir: Path):
    """The disk fills up half-way through writing the task's parquet file."""

    def write_table(table, where, *args, **kwargs):
        Path(where).write_bytes(b"PAR1 half")
        raise OSError(28, "No space left on device", str(where))

    monkeypatch.setattr(tasks.pq, "write_table", write_table)
    return lambda: prepare_prompt_files(DataConfig(num_prompts=4, eval_prompts=0), run_dir)


# Each builder: (tmp_path, monkeypatch) -> (action, exception type, strings the message must contain).
CASES = {
    # ---- config ------------------------------------------------------------------------------
    "config-unknown-key": lambda t, mp: (
        lambda: load_config(_yaml(t, "train:\n  totl_steps: 5\n")), ConfigError, ["train.totl_steps", str(t / "job.yaml")]
    ),
    "config-wrong-type": lambda t, mp: (
        lambda: load_config(_yaml(t, "train:\n  total_steps: many\n")), ConfigError, ["train.total_steps", "many"]
    ),
    "config-grpo-needs-n>=2": lambda t, mp: (
        lambda: _preflight("algorithm.preset=grpo", "generation.sampling.n=1"), ConfigError, ["generation.sampling.n", "grpo"]
    ),
    "config-batch-not-divisible-by-world-size": lambda t, mp: (
        lambda: _preflight("train.prompts_per_step=3", "generation.sampling.n=3", "learner.world_size=2"),
        ConfigError,
        ["train.prompts_per_step", "generation.sampling.n", "learner.world_size=2", "= 9"],
    ),
    "config-mini-batches-exceed-rank-batch": lambda t, mp: (
        lambda: _preflight("learner.world_size=2", "learner.mini_batches=17"), ConfigError, ["learner.mini_batches=17"]
    ),
    "config-negative-lr": lambda t, mp: (lambda: load_config(None, ["learner.lr=-0.001"]), ConfigError, ["learner.lr", "-0.001"]),
    "config-unknown-preset": lambda t, mp: (
        lambda: load_config(_yaml(t, "algorithm:\n  preset: ppo2\n")), ConfigError, ["algorithm.preset", "ppo2"]
    ),
    "config-judge-template-misspelt": lambda t, mp: (
        lambda: _preflight("scoring.rewards=[{type: verifier, weight: 0},"
                           " {type: judge, model: /nowhere, template: correctnes}]"),
        ConfigError,
        ["scoring.rewards[1] (judge 'judge').template", "'correctnes' is not a built-in template",
         "best_of_group, correctness, score", "did you mean 'correctness'?"],
    ),
    "config-reward-fn-syntax": lambda t, mp: (
        lambda: load_config(None, ["data.reward_fn=my_rewards.score"]), ConfigError, ["data.reward_fn", "module:function"]
    ),
    "config-renamed-sft-warmup": lambda t, mp: (
        lambda: load_config(None, ["model.warmup_steps=5"]), ConfigError, ["model.warmup_steps was renamed to model.sft_warmup_steps"]
    ),
    "config-renamed-lr-warmup": lambda t, mp: (
        lambda: load_config(None, ["learner.warmup_steps=5"]), ConfigError, ["learner.warmup_steps was renamed to learner.lr_warmup_steps"]
    ),
    "config-backend-without-type": lambda t, mp: (
        lambda: load_config(None, ["learner.backend={zero_stage: 2}"]), ConfigError, ["learner.backend", "fsdp2, deepspeed"]
    ),
    "config-invalid-yaml": lambda t, mp: (
        lambda: load_config(_yaml(t, "train: [unclosed\n  total_steps: 3\n")), ConfigError, [str(t / "job.yaml"), "YAML"]
    ),
    "config-not-a-mapping": lambda t, mp: (
        lambda: load_config(_yaml(t, "- a\n- b\n")), ConfigError, [str(t / "job.yaml"), "mapping"]
    ),
    "config-missing-file": lambda t, mp: (
        lambda: load_config(t / "nope.yaml"), ConfigError, [str(t / "nope.yaml"), "does not exist"]
    ),
    # ---- dataset -----------------------------------------------------------------------------
    "data-missing-file": lambda t, mp: (
        lambda: read_prompt_file(t / "none.parquet"), FileNotFoundError, [str(t / "none.parquet")]
    ),
    "data-wrong-suffix": lambda t, mp: (
        lambda: read_prompt_file(_jsonl(t, ROWS, "prompts.csv")), ValueError, [str(t / "prompts.csv"), ".parquet or .jsonl"]
    ),
    "data-missing-prompt-column": lambda t, mp: (
        lambda: read_prompt_file(_jsonl(t, [{"prompt_id": "a", "text": "x"}])), ValueError, [str(t / "prompts.jsonl"), "['prompt']"]
    ),
    "data-missing-named-id-column": lambda t, mp: (
        lambda: read_prompt_file(_parquet(t, pa.table({"prompt": ["x"]})), PromptColumns(prompt_id="id")), ValueError,
        [str(t / "prompts.parquet"), "['id']", "data.columns"]
    ),
    "data-missing-mapped-prompt-column": lambda t, mp: (
        lambda: read_prompt_file(_jsonl(t, ROWS), PromptColumns(prompt="question")), ValueError,
        [str(t / "prompts.jsonl"), "['question']", "data.columns"]
    ),
    "data-messages-not-a-chat": lambda t, mp: (
        lambda: read_prompt_file(_jsonl(t, [{"messages": "hello"}]), PromptColumns(messages="messages")), ValueError,
        [str(t / "prompts.jsonl"), "'row-0'", "role, content"]
    ),
    "data-messages-end-with-the-answer": lambda t, mp: (
        lambda: read_prompt_file(_jsonl(t, [{"messages": [{"role": "user", "content": "hi"},
                                                           {"role": "assistant", "content": "yo"}]}]),
                                 PromptColumns(messages="messages")), ValueError,
        [str(t / "prompts.jsonl"), "'row-0'", "assistant turn"]
    ),
    "data-folder-not-a-dataset": lambda t, mp: (
        lambda: read_prompt_file(t), ValueError, [str(t), "state.json", "save_to_disk"]
    ),
    "data-dataset-dict-folder": lambda t, mp: (
        lambda: read_prompt_file(_write(t, "dataset_dict.json", '{"splits": ["train", "test"]}').parent), ValueError,
        [str(t), "DatasetDict", str(t / "train")]
    ),
    "data-chat-template-without-one": lambda t, mp: (
        lambda: apply_chat_template([Prompt("a", "1+1=", "2")], _NoTemplate()), ValueError,
        ["data.chat_template", "no chat template"]
    ),
    "data-empty-file": lambda t, mp: (
        lambda: read_prompt_file(_jsonl(t, [])), ValueError, [str(t / "prompts.jsonl"), "empty"]
    ),
    "data-blank-lines-only": lambda t, mp: (
        lambda: read_prompt_file(_write(t, "blank.jsonl", "\n\n")),
        ValueError,
        [str(t / "blank.jsonl"), "no rows"],
    ),
    "data-zero-rows-parquet": lambda t, mp: (
        lambda: read_prompt_file(_parquet(t, pa.table({"prompt_id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())}))),
        ValueError,
        [str(t / "prompts.parquet"), "no rows"],
    ),
    "data-duplicate-ids": lambda t, mp: (
        lambda: read_prompt_file(_jsonl(t, ROWS + [dict(ROWS[1], prompt="7+7=")])), ValueError, [str(t / "prompts.jsonl"), "unique", "'b'"]
    ),
    "data-null-ids": lambda t, mp: (
        lambda: read_prompt_file(_parquet(t, pa.table({"prompt_id": ["a", None], "prompt": ["x", "y"]}))),
        ValueError,
        [str(t / "prompts.parquet"), "prompt_id", "null", "(row 2)"],
    ),
    "data-empty-prompt": lambda t, mp: (
        lambda: read_prompt_file(_jsonl(t, [ROWS[0], dict(ROWS[1], prompt="  ")])), ValueError, [str(t / "prompts.jsonl"), "['b']"]
    ),
    "data-corrupt-parquet": lambda t, mp: (
        lambda: read_prompt_file(_write(t, "bad.parquet", b"not parquet at all" * 4)),
        ValueError,
        [str(t / "bad.parquet"), "parquet"],
    ),
    "data-corrupt-jsonl": lambda t, mp: (
        lambda: read_prompt_file(_write(t, "bad.jsonl", '{"prompt_id": "a", "prompt": \n')),
        ValueError,
        [str(t / "bad.jsonl"), "JSON Lines"],
    ),
    "data-task-write-fails-midway": lambda t, mp: (
        _failing_write(mp, t / "run"), OSError, ["No space left on device", "train.parquet"]
    ),
    "dry-run-bad-data-path": lambda t, mp: (
        lambda: _dry_run(f"data.path={_jsonl(t, [])}"), SystemExit, ["data.path", str(t / "prompts.jsonl"), "empty"]
    ),
    # ---- model folder ------------------------------------------------------------------------
    "model-missing": lambda t, mp: (lambda: validate_model_dir(t / "nope"), FileNotFoundError, [str(t / "nope"), "does not exist"]),
    "model-no-config": lambda t, mp: (
        lambda: validate_model_dir(_model_dir(t, drop=("config.json",))), ValueError, [str(t / "model"), "config.json"]
    ),
    "model-config-not-json": lambda t, mp: (
        lambda: validate_model_dir(_model_dir(t, config__json="{oops")), ValueError, [str(t / "model"), "config.json", "not valid JSON"]
    ),
    "model-no-tokenizer": lambda t, mp: (
        lambda: validate_model_dir(_model_dir(t, drop=("tokenizer.json",))), ValueError, [str(t / "model"), "tokenizer"]
    ),
    "model-no-weights": lambda t, mp: (
        lambda: validate_model_dir(_model_dir(t, drop=("model.safetensors",))), ValueError, [str(t / "model"), "no weights"]
    ),
    "model-missing-shard": lambda t, mp: (
        lambda: validate_model_dir(
            _model_dir(t, model__safetensors__index__json=json.dumps({"weight_map": {"w": "model-00002-of-00002.safetensors"}}))
        ),
        ValueError,
        [str(t / "model"), "model-00002-of-00002.safetensors"],
    ),
    "model-no-chat-template": lambda t, mp: (
        lambda: validate_model_dir(_model_dir(t), needs_chat_template=True), ValueError, [str(t / "model"), "chat template"]
    ),
    "dry-run-bad-model-path": lambda t, mp: (
        lambda: _dry_run(f"model.path={_model_dir(t, drop=('model.safetensors',))}"), SystemExit, ["model.path", str(t / "model"), "no weights"]
    ),
    "dry-run-missing-reward-model": lambda t, mp: (
        lambda: _dry_run(f"scoring.rewards=[{{type: verifier}}, {{type: model, models: [{{path: {t / 'rm'}}}]}}]"), SystemExit,
        ["scoring.rewards[1].models[0].path", str(t / "rm"), "does not exist"]
    ),
    # ---- reward function ---------------------------------------------------------------------
    "dry-run-reward-fn-module-missing": lambda t, mp: (
        lambda: _dry_run("data.reward_fn=no_such_rewards_mod:score"), SystemExit, ["scoring.rewards[0].function", "no_such_rewards_mod"]
    ),
    "reward-fn-module-missing": lambda t, mp: (
        lambda: RuleReward(None, reward_fn="no_such_rewards_mod:score"), ValueError, ["scoring.rewards[].function", "no_such_rewards_mod"]
    ),
    "reward-fn-function-missing": lambda t, mp: (
        lambda: RuleReward(None, reward_fn="json:no_such_fn"), ValueError, ["scoring.rewards[].function", "no_such_fn"]
    ),
    "reward-fn-not-callable": lambda t, mp: (
        lambda: RuleReward(None, reward_fn="json:__version__"), ValueError, ["scoring.rewards[].function", "__version__", "not a function"]
    ),
}


class _NoTemplate:
    chat_template = None


@pytest.mark.parametrize("build", list(CASES.values()), ids=list(CASES))
def test_bad_input_names_the_culprit(build, tmp_path, monkeypatch):
    action, error, culprits = build(tmp_path, monkeypatch)
    with pytest.raises(error) as info:
        action()
    message = str(info.value)
    for culprit in culprits:
        assert culprit in message, f"{culprit!r} not in: {message}"
    half_written = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]
    assert not half_written, half_written


def test_good_inputs_pass(tmp_path):
    """The control: what the table breaks is accepted when whole."""
    assert validate_model_dir(_model_dir(tmp_path)) == tmp_path / "model"
    (tmp_path / "model" / "chat_template.jinja").write_text("{{ messages }}")
    validate_model_dir(tmp_path / "model", needs_chat_template=True)
    assert len(read_prompt_file(_jsonl(tmp_path, ROWS))) == 2
    preflight(load_config(None, ["train.prompts_per_step=3", "generation.sampling.n=4", "learner.world_size=2",
                                 "data.reward_fn=rlhf_cluster.rewards.controls:placebo_arithmetic"]))


def test_reward_model_path_must_be_a_trained_reward_model(tiny_model_path, tmp_path):
    from rlhf_cluster.job.validation import ModelDirError, validate_reward_model_dir

    with pytest.raises(ModelDirError, match=r"scoring.reward_models: model folder .*nope does not exist"):
        validate_reward_model_dir(tmp_path / "nope")
    # A policy folder is a model folder, but not a reward model: the head and marker are missing.
    with pytest.raises(ModelDirError, match=r"scoring.reward_models: .* has no reward_model.json, reward_head.safetensors"):
        validate_reward_model_dir(tiny_model_path)


def test_sft_stage_batch_must_split_over_ranks():
    with pytest.raises(ConfigError, match=r"sft: .*batch_size=30 must be divisible by world_size=4"):
        load_config(None, ["sft.batch_size=30", "sft.world_size=4"])
