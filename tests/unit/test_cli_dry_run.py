"""`rlhf-cluster train CONFIG --dry-run` passes for every shipped config and names what does not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from actors.commands.cli import app

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_passes_the_dry_run(config):
    result = CliRunner().invoke(app, ["train", str(config), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "dry run ok" in result.output


def test_too_many_gpus_fails_with_a_clear_message():
    args = ["train", str(CONFIGS[0]), "--dry-run", "--set", "generation.resources.num_gpus=1", "--set", "generation.replicas=2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "generation pool: each actor needs 1 GPU (generation.resources)" in result.output
    assert "the job needs 2 GPU in all (generation 2 x 1)" in result.output


def test_missing_model_path_fails_the_dry_run(tmp_path):
    result = CliRunner().invoke(app, ["train", str(CONFIGS[0]), "--dry-run", "--set", f"model.path={tmp_path}/nope"])
    assert result.exit_code == 2
    assert "model.path" in result.output and "config.json" in result.output


def test_bad_config_field_is_named():
    result = CliRunner().invoke(app, ["train", str(CONFIGS[0]), "--dry-run", "--set", "train.total_stepz=3"])
    assert result.exit_code == 2
    assert "train.total_stepz" in result.output


def test_preflight_refusal_fails_the_dry_run_naming_the_field():
    result = CliRunner().invoke(app, ["train", str(CONFIGS[0]), "--dry-run", "--set", "buffer.capacity=1"])
    assert result.exit_code == 2
    assert "buffer.capacity=1" in result.output and "dry run ok" not in result.output


def test_preflight_warnings_are_printed():
    three_stage = next(c for c in CONFIGS if c.name == "three_stage.yaml")
    result = CliRunner().invoke(app, ["train", str(three_stage), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "warning: scoring.rewards[1] (type: model) lists no models" in result.output


@pytest.mark.parametrize("command", [["train"], ["submit", "--address", "http://127.0.0.1:9"], ["pipeline"]])
def test_a_refused_config_ends_before_ray_or_the_cluster_is_touched(monkeypatch, command):
    from actors.commands import jobs, stages, training

    def no_cluster(*args, **kwargs):
        raise AssertionError("preflight should have refused the config first")

    # Where each command looks the names up.
    monkeypatch.setattr(training, "connect", no_cluster)
    monkeypatch.setattr(stages, "connect", no_cluster)
    monkeypatch.setattr(jobs, "job_client", no_cluster)
    config = next(c for c in CONFIGS if c.name == "three_stage.yaml")
    result = CliRunner().invoke(app, [command[0], str(config), *command[1:], "--set", "buffer.capacity=1"])
    assert result.exit_code == 2, result.output
    assert "error: config refused" in result.output and "buffer.capacity=1" in result.output


def test_submit_stages_the_users_modules_and_working_dir(tmp_path, monkeypatch):
    """What `submit` ships: the code, the config, a reward module found next to the user, the
    modules and the working directory named on the command line."""
    from actors.commands.submission import stage_working_dir
    from rlhf_cluster.config import load_config

    home = tmp_path / "home"
    (home / "mypkg").mkdir(parents=True)
    (home / "mypkg" / "__init__.py").write_text("")
    (home / "my_rewards.py").write_text("def score(response, answer):\n    return 1.0\n")
    (home / "helpers.py").write_text("X = 1\n")
    (home / "assets").mkdir()
    (home / "assets" / "lexicon.txt").write_text("words")
    monkeypatch.chdir(home)
    cfg = load_config(None, ["scoring.rewards=[{type: function, function: 'my_rewards:score'}]"])
    stage = stage_working_dir(cfg, [home / "helpers.py", home / "mypkg"], home / "assets")
    try:
        shipped = {p.relative_to(stage).as_posix() for p in stage.rglob("*") if "__pycache__" not in p.parts}
        assert {"my_rewards.py", "helpers.py", "mypkg/__init__.py", "lexicon.txt", "job.yaml",
                "rlhf_cluster/config/__init__.py", "actors/commands/cli.py"} <= shipped
        assert not any(p.startswith("site-packages") for p in shipped)
    finally:
        import shutil

        shutil.rmtree(stage)


def _home(tmp_path, monkeypatch, **modules: str):
    """A user's folder holding `modules` (name -> source), made the working directory."""
    home = (tmp_path / "home").resolve()
    home.mkdir()
    for name, source in modules.items():
        (home / f"{name}.py").write_text(source)
    monkeypatch.chdir(home)
    return home


def test_submit_ships_the_policy_loss_module_as_it_does_the_reward_modules(tmp_path, monkeypatch, capsys):
    """`algorithm.loss.function` names a module beside the user, as a reward function does: both
    reach the cluster, and a module both name is shipped once."""
    from actors.commands.submission import stage_working_dir, user_modules
    from rlhf_cluster.config import load_config

    home = _home(tmp_path, monkeypatch, my_losses="def reinforce(*args, **kwargs):\n    return None\n",
                 my_code="def score(response, answer):\n    return 1.0\n\ndef loss(*a, **k):\n    pass\n")
    cfg = load_config(None, ["algorithm.loss.function=my_losses:reinforce"])
    stage = stage_working_dir(cfg, [], None)
    try:
        assert (stage / "my_losses.py").read_text().startswith("def reinforce")
    finally:
        import shutil

        shutil.rmtree(stage)
    assert f"shipping policy loss module my_losses ({home / 'my_losses.py'})" in capsys.readouterr().err
    both = load_config(None, ["scoring.rewards=[{type: function, function: 'my_code:score'}]",
                              "algorithm.loss.function=my_code:loss"])
    assert user_modules(both) == [home / "my_code.py"]


def test_submit_ships_an_environment_class_and_an_agent_module_too(tmp_path, monkeypatch):
    """Found in review: only reward and loss modules were shipped, so an environment class or an
    agent function beside the user failed on the cluster; a built-in environment ships nothing."""
    from actors.commands.submission import user_modules
    from rlhf_cluster.config import load_config

    home = _home(tmp_path, monkeypatch, my_envs="class Sokoban:\n    pass\n",
                 my_agent="def run(client, prompt):\n    return None\n")
    env = load_config(None, ["generation.environment=my_envs:Sokoban"])
    assert user_modules(env) == [home / "my_envs.py"]
    assert user_modules(load_config(None, ["generation.environment=tools"])) == []
    agent = load_config(None, ["generation.agent={function: 'my_agent:run'}"])
    assert user_modules(agent) == [home / "my_agent.py"]
    group_filter = load_config(None, ["algorithm.shaping.dynamic_sampling=true",
                                      "algorithm.shaping.group_filter=my_agent:run"])  # fmt: skip
    assert user_modules(group_filter) == [home / "my_agent.py"]


def test_the_real_model_example_names_the_inputs_its_script_builds(tmp_path):
    # configs/examples/ name inputs built by a script (scripts/real_model_example.py), not shipped:
    # until they exist, the dry run refuses and names each missing one.
    config = CONFIGS[0].parent / "examples" / "real_model.yaml"
    result = CliRunner().invoke(app, ["train", str(config), "--dry-run", "--set", f"model.path={tmp_path}/model",
                                      "--set", f"data.path={tmp_path}/sums.parquet"])
    assert result.exit_code == 2
    assert "model.path: model folder" in result.output and "data.path: prompt file" in result.output


def test_a_reward_module_beside_you_is_found_as_python_m_would(tmp_path, monkeypatch):
    """Trial 23a M2: README's `function: "my_rewards:score"` with my_rewards.py in the working
    directory was refused by `rlhf-cluster train` (a console script's sys.path lacks the working
    directory; `submit` had added it). A job started from here gives it to its workers (Ray adds
    the driver's working directory to theirs)."""
    import sys

    module = "my_rewards_23m2"
    (tmp_path / f"{module}.py").write_text("def score(response: str, answer: str) -> float:\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    args = ["train", str(CONFIGS[0]), "--dry-run", "--set", f"run_dir={tmp_path}/run",
            "--set", f"scoring.rewards=[{{type: function, function: '{module}:score'}}]"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "reward: function my_rewards_23m2:score" in result.output
