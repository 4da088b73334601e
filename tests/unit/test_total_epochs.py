"""`train.total_epochs` (veRL's `trainer.total_epochs`, TRL's `num_train_epochs`): the job's steps
are counted at its start from the prompts it trains on (whole steps of `prompts_per_step`, as veRL's
loader drops the last partial batch), before anything that reads `train.total_steps` is built. The
driver's use of it runs in tests/integration/test_byo_model.py (a CLI job of one epoch)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_cluster.config import ConfigError, load_config
from rlhf_cluster.job.epochs import with_epoch_steps
from rlhf_cluster.job.preflight import preflight


def test_the_steps_are_whole_steps_of_every_epoch():
    cfg = load_config(None, ["train.total_epochs=3", "train.prompts_per_step=8"])
    assert with_epoch_steps(cfg, 35).train.total_steps == 3 * (35 // 8)  # 3 prompts left over each epoch
    resolved = with_epoch_steps(cfg, 64)
    assert (resolved.train.total_steps, resolved.train.total_epochs, resolved.train.prompts_per_step) == (24, 3, 8)
    assert cfg.train.total_steps == 20  # the config as loaded is not changed
    plain = load_config(None, ["train.total_steps=7"])
    assert with_epoch_steps(plain, 35) is plain  # without epochs: the config as it is


def test_an_epoch_without_a_step_and_a_warm_up_past_the_end_are_refused():
    with pytest.raises(ValueError, match=r"train.total_epochs: the 5 training prompts are fewer than "
                                         r"train.prompts_per_step=8, so an epoch has no step"):
        with_epoch_steps(load_config(None, ["train.total_epochs=2", "train.prompts_per_step=8"]), 5)
    ppo = Path(__file__).resolve().parents[2] / "configs" / "ppo.yaml"
    assert load_config(ppo).train.total_steps == 40
    # A warm-up of 45 steps, past the 40 the file names: not checked until the epochs' steps are counted.
    cfg = load_config(ppo, ["critic.freeze_policy_steps=45", "train.total_epochs=1", "train.prompts_per_step=8"])
    assert with_epoch_steps(cfg, 400).train.total_steps == 50
    with pytest.raises(ValueError, match=r"critic.freeze_policy_steps=45 >= the 45 steps of train.total_epochs=1"):
        with_epoch_steps(cfg, 360)


def test_total_steps_beside_total_epochs_is_warned_about():
    def warned(*overrides: str) -> list[str]:
        return [w for w in preflight(load_config(None, list(overrides)), files=False) if "total_epochs" in w]

    [warning] = warned("train.total_epochs=2", "train.total_steps=50")
    assert "train.total_steps=50 is replaced by the steps of train.total_epochs=2" in warning, warning
    assert warned("train.total_epochs=2") == warned("train.total_steps=50") == []
    # A refresh "never due" cannot be told before the steps are counted.
    refresh = "algorithm.kl.reference_refresh={every_steps: 30}"
    assert any("ends before its first refresh" in w for w in preflight(load_config(None, [refresh]), files=False))
    assert not any("ends before its first refresh" in w
                   for w in preflight(load_config(None, [refresh, "train.total_epochs=9"]), files=False))


def test_a_built_in_tasks_epochs_are_checked_before_the_start():
    """A built-in task's training prompts are its `data.num_prompts`: preflight counts its epochs."""
    with pytest.raises(ConfigError, match=r"train.total_epochs: the 4 training prompts are fewer than "
                                          r"train.prompts_per_step=8"):
        preflight(load_config(None, ["train.total_epochs=1", "data.num_prompts=4", "train.prompts_per_step=8"]),
                  files=False)
    preflight(load_config(None, ["train.total_epochs=1", "data.num_prompts=8", "train.prompts_per_step=8"]),
              files=False)


def test_a_resumed_run_whose_epochs_count_other_steps_is_warned_about(tmp_path):
    """The prompt file (or prompts_per_step) changed since the run: the end of training and of the LR
    schedule moves with the count; said, against the run's own config.yaml."""
    import yaml

    from rlhf_cluster.job.epochs import steps_recounted

    cfg = load_config(None, ["train.total_epochs=2", "train.prompts_per_step=8"])
    run_config = tmp_path / "config.yaml"
    assert steps_recounted(run_config, with_epoch_steps(cfg, 64)) is None  # no record: nothing to compare
    run_config.write_text(yaml.safe_dump(with_epoch_steps(cfg, 64).model_dump(mode="json")))  # 16 steps, as it ran
    assert steps_recounted(run_config, with_epoch_steps(cfg, 64)) is None
    warning = steps_recounted(run_config, with_epoch_steps(cfg, 40))
    assert warning is not None and "the run counted 16 steps, the training prompts give 10 now" in warning, warning
    assert steps_recounted(run_config, load_config(None, ["train.total_steps=10"])) is None  # not a run of epochs


def test_the_dry_run_counts_a_user_files_epochs_as_the_start_will(tmp_path):
    """A user's file is counted by the dry run with the job start's own selection (`prompt_sets`:
    the held-out split, the overlong filter): the steps it names, and an epoch without a step
    refused there, before a run directory exists."""
    import json

    from typer.testing import CliRunner

    from actors.commands.cli import app
    from tests.byo import save_chat_model

    model = save_chat_model(tmp_path / "model")
    data = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": f"What is {i} + {i}?" + (" and" * 300 if i == 9 else ""), "answer": str(2 * i)} for i in range(12)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    args = ["train", "--dry-run", "--set", f"model.path={model}", "--set", f"data.path={data}",
            "--set", "data.eval_fraction=0.25", "--set", "data.eval_prompts=2", "--set", "data.overlong_prompts=drop",
            "--set", "generation.max_model_len=256", "--set", f"run_dir={run}", "--set", "learner.world_size=1",
            "--set", "train.total_epochs=3", "--set", "train.prompts_per_step=2"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    # 12 rows: 3 held out (0.25), one of the 9 left too long for a response: 8 training, 4 steps an epoch.
    assert "prompts: 8 training (1 too long, dropped), 3 held out, 2 of them evaluated (data.eval_prompts=2)" in (
        result.output
    )
    assert "dry run ok: " in result.output and "12 steps (train.total_epochs=3)" in result.output
    refused = CliRunner().invoke(app, [*args, "--set", "train.prompts_per_step=9"])
    assert refused.exit_code == 2 and "dry run ok" not in refused.output
    assert "train.total_epochs: the 8 training prompts are fewer than train.prompts_per_step=9" in refused.output
    assert not run.exists()
    # By total_steps the same step is taken, drawing every prompt twice a step: said (trial 23a M8).
    steps = [*args, "--set", "train.total_epochs=null", "--set", "train.total_steps=2", "--set", "train.prompts_per_step=16"]
    drawn = CliRunner().invoke(app, steps)
    assert drawn.exit_code == 0 and "dry run ok: " in drawn.output and ", 2 steps, " in drawn.output, drawn.output
    assert "warning: train.prompts_per_step=16 with 8 training prompts: each step draws every prompt about 2 times" in (
        drawn.output
    )
