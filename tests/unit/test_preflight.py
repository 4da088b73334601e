"""preflight: every config of `BAD_CONFIGS` (tests/unit/bad_configs.py) loads but is refused, with a
message naming the field; a file case is refused for its file alone; warnings come back, not raised."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from bad_configs import BAD_CONFIGS, build

from rlhf_cluster.config import ConfigError, JobConfig, load_config
from rlhf_cluster.job.preflight import preflight

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=[c.name for c in BAD_CONFIGS])
def test_bad_config_is_refused_naming_the_field(case):
    cfg = build(case)  # loads: every field is valid on its own
    with pytest.raises(ConfigError) as info:
        preflight(cfg)
    message = str(info.value)
    for expected in [case.field, *case.also]:
        assert expected in message, f"{expected!r} not in: {message}"


@pytest.mark.parametrize("case", [c for c in BAD_CONFIGS if c.reads_files], ids=lambda c: c.name)
def test_file_checks_are_skipped_without_files(case):
    """Each file case is refused only for its file: the config rules alone accept it (`submit`)."""
    preflight(build(case), files=False)


@pytest.mark.parametrize("rope", [
    {},
    {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
    {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}},  # transformers 5 writes this
    {"text_config": {"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 4.0}}}},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},  # no factor: not scaled
], ids=["none", "rope_scaling", "rope_parameters", "nested", "default"])
def test_a_context_past_the_model_folders_positions_is_refused_unless_scaled(tmp_path, rope):
    """vLLM refuses it too, but only once an engine starts; with a rope scaling factor vLLM's own
    arithmetic decides."""
    import json

    rope_scaling = None if rope in ({}, {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}) else rope
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 128, **rope}))
    with pytest.raises(ConfigError) as info:  # the folder has no weights: refused for that in any case
        preflight(JobConfig.model_validate({"model": {"path": str(tmp_path)}}))
    refused = "generation.max_model_len=256 is longer than the model's 128 positions" in str(info.value)
    assert refused == (rope_scaling is None), str(info.value)


def test_a_resume_path_that_is_no_checkpoint_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--resume .*no manifest.json"):
        preflight(JobConfig(), resume=str(tmp_path))  # a folder, but no checkpoint
    # A path that is no folder (`latest`, a typo) is told what --resume takes (trial 23a M7).
    for nowhere in ("latest", str(tmp_path / "nowhere")):
        with pytest.raises(ConfigError, match=f"--resume {nowhere}: no such checkpoint folder; --resume takes `auto`"):
            preflight(JobConfig(), resume=nowhere)
    assert preflight(JobConfig(), resume="auto") == []  # auto: the newest checkpoint, or a fresh start


def test_the_default_config_passes():
    assert preflight(JobConfig()) == []


def test_every_problem_is_reported_at_once():
    cfg = load_config(None, ["buffer.capacity=1", "model.path=/nonexistent/rlhf-preflight/model"])
    with pytest.raises(ConfigError, match=r"config refused \(2 problems\)") as info:
        preflight(cfg)
    assert "buffer.capacity" in str(info.value) and "model.path" in str(info.value)


def test_warnings_are_returned():
    cfg = load_config(None, ["critic={init: policy}", "scoring.rewards=[verifier, model]"])
    warnings = preflight(cfg)
    assert any("only gae uses the critic" in w for w in warnings)
    assert any("scoring.rewards[1] (type: model) lists no models" in w for w in warnings)


def test_preflight_imports_neither_ray_nor_torch_at_module_level():
    tree = ast.parse((REPO / "rlhf_cluster" / "job" / "preflight.py").read_text())
    top = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    top |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
    assert not top & {"ray", "torch"}, top


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=[c.name for c in BAD_CONFIGS])
def test_the_dry_run_and_the_driver_refuse_the_same_bad_configs(case, tmp_path, monkeypatch):
    """One preflight serves both: `--dry-run` on the config's file and the Driver built from it refuse
    it with the same field named, and the Driver does so before it writes anything or starts an actor."""
    import yaml
    from typer.testing import CliRunner

    from actors.commands.cli import app
    from actors.job import Job

    cfg = build(case, {"run_dir": str(tmp_path / "run")})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["train", str(path), "--dry-run"])
    assert result.exit_code != 0 and case.field in result.output, result.output
    import actors.checkpointer
    import actors.driver

    def no_actors(*args, **kwargs):
        raise AssertionError("preflight should have refused the config before any actor starts")

    # The two calls that start actors: the learner's ranks and the worker pools.
    monkeypatch.setattr(actors.checkpointer, "build_learner", no_actors)
    monkeypatch.setattr(actors.driver, "Cluster", no_actors)
    with pytest.raises(ConfigError) as info:
        Job(load_config(path))
    assert case.field in str(info.value)
    assert not (tmp_path / "run").exists()


def test_a_users_file_scored_by_the_tasks_verifier_is_warned_about():
    warned = preflight(load_config(None, ["data.path=/data/gsm8k.parquet"]), files=False)
    assert any("data.verifier is not set" in w and "'arithmetic'" in w for w in warned), warned
    assert not any("data.verifier" in w for w in preflight(
        load_config(None, ["data.path=/data/gsm8k.parquet", "data.verifier=gsm8k"]), files=False))


def test_a_users_file_without_held_out_prompts_is_warned_about():
    def warned(*overrides: str) -> list[str]:
        cfg = load_config(None, ["data.path=/data/gsm8k.parquet", "data.verifier=gsm8k", *overrides])
        return [w for w in preflight(cfg, files=False) if "held-out" in w]

    [warning] = warned("data.eval_every_steps=5")
    assert "data.eval_prompts=64 has none to choose from" in warning and "data.eval_fraction" in warning, warning
    assert "data.eval_every_steps=5" in warning, warning
    assert warned("data.eval_fraction=0.1") == warned("data.eval_path=/data/test.parquet") == []
    assert warned("data.eval_prompts=0") == []  # said: no evaluation wanted
    assert not [w for w in preflight(load_config(None), files=False) if "held-out" in w]  # the built-in task's own


# ---- the episode code a config names (generation.environment, generation.agent.function) -------------------
EPISODE_CODE = [
    ("generation.environment=foo", "generation.environment='foo' must look like 'module:Class'"),
    ("generation.environment=tool", "(did you mean 'tools'?)"),
    ("generation.environment=nomod_h17:Env", "generation.environment='nomod_h17:Env': module 'nomod_h17' not found"),
    ("generation.environment=json:Nope", "generation.environment='json:Nope': module 'json' has no attribute 'Nope'"),
    ("generation.environment=json:dumps", "expected a class with reset(prompt) and step(turn) methods"),
    ("generation.agent={function: 'nomod_h17:run'}", "generation.agent.function='nomod_h17:run': module 'nomod_h17'"),
    ("generation.agent={function: 'run'}", "generation.agent.function='run' must look like 'module:function'"),
    ("generation.agent={function: 'json:nope'}", "module 'json' has no attribute 'nope'"),
]


@pytest.mark.parametrize(("override", "message"), EPISODE_CODE, ids=[o for o, _ in EPISODE_CODE])
def test_the_episode_code_a_config_names_is_loaded_by_preflight(override, message):
    cfg = load_config(None, [override])  # valid field by field: only loading the code refuses it
    with pytest.raises(ConfigError) as info:
        preflight(cfg)
    assert message in str(info.value)
    preflight(cfg, files=False)  # the code is loaded where the job runs (`submit` checks the config rules only)


def test_good_episode_code_passes_preflight():
    preflight(load_config(None, ["generation.environment=tools"]))
    preflight(load_config(None, ["generation.environment=rlhf_cluster.generation.environments:ScriptedEnvironment"]))
    preflight(load_config(None, ["generation.agent={function: 'json:dumps'}"]))


@pytest.mark.parametrize(
    "override, dry_run",
    [("generation.environment=foo", True), ("generation.environment=foo", False),
     ("generation.agent={function: 'nomod_h17:run'}", True)],
    ids=["env-dry_run", "env-real_run", "agent-dry_run"],  # the real run checks what the dry run does (8 s a run)
)
def test_the_cli_refuses_bad_episode_code_before_ray_starts(override, dry_run, tmp_path):
    """preflight's refusal naming the field and exit code 2, from the dry run and from a real run alike (the
    real run used to start Ray and die in a generation worker 26 s later with a long traceback)."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "actors.commands.cli", "train", str(REPO / "configs" / "sync.yaml"),
            "--set", override, "--set", f"run_dir={tmp_path / 'run'}", *(["--dry-run"] if dry_run else [])]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=90)
    field = override.split("=")[0] + (".function" if "agent" in override else "")
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: config refused:"] and f"\n  {field}=" in done.stderr, done.stderr  # as a reward module's
    assert "Traceback" not in done.stderr and "dry run ok" not in done.stdout
    assert not (tmp_path / "run").exists()
