"""`train.total_epochs`: the job's steps counted from its training prompts at its start, as veRL
counts `len(train_dataloader) * total_epochs` (a loader that drops the last partial batch): the
config a job runs with holds them as `train.total_steps`, set once, before any part that reads it
is built, and recorded in the run's config.yaml."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from rlhf_cluster.config import JobConfig

log = logging.getLogger(__name__)


def with_epoch_steps(cfg: JobConfig, train_prompts: int, quiet: bool = False) -> JobConfig:
    """`cfg` with `train.total_steps` = `train.total_epochs` x (`train_prompts` // `prompts_per_step`);
    `cfg` itself without `total_epochs`. `train_prompts`: the prompts the job trains on (after the
    held-out split and the overlong filter). `quiet`: no log lines (preflight's check of a built-in task)."""
    t = cfg.train
    if t.total_epochs is None:
        return cfg
    per_epoch = train_prompts // t.prompts_per_step
    if per_epoch == 0:
        raise ValueError(
            f"train.total_epochs: the {train_prompts} training prompts are fewer than train.prompts_per_step="
            f"{t.prompts_per_step}, so an epoch has no step; lower train.prompts_per_step or set train.total_steps"
        )
    steps = t.total_epochs * per_epoch
    held = cfg.critic.freeze_policy_steps if cfg.critic is not None else 0
    if held >= steps:
        raise ValueError(
            f"critic.freeze_policy_steps={held} >= the {steps} steps of train.total_epochs={t.total_epochs}: the "
            "policy would never be trained; lower critic.freeze_policy_steps or raise train.total_epochs"
        )
    every = cfg.reference_refresh_every
    if every and every >= steps and not quiet:  # (preflight's warning, which could not count the steps)
        log.warning(
            f"algorithm.kl.reference_refresh.every_steps={every} with {steps} steps: the job ends before its first "
            "refresh"
        )
    if not quiet:
        log.info(
            f"train.total_epochs={t.total_epochs}: {train_prompts} training prompts, {per_epoch} steps of "
            f"{t.prompts_per_step} an epoch ({train_prompts - per_epoch * t.prompts_per_step} left over): "
            f"{steps} steps"
        )
    return cfg.model_copy(update={"train": t.model_copy(update={"total_steps": steps})})


def prompts_drawn_again(cfg: JobConfig, train_prompts: int) -> str | None:
    """A warning when a step asks for more prompts than the job trains on (`train.total_steps`: under
    `total_epochs` that is refused): every step then draws each prompt several times."""
    per_step = cfg.train.prompts_per_step
    if cfg.train.total_epochs is not None or train_prompts >= per_step:
        return None
    return (
        f"train.prompts_per_step={per_step} with {train_prompts} training prompts: each step draws every prompt "
        f"about {per_step / train_prompts:.3g} times (several groups of one prompt in a batch); lower "
        "train.prompts_per_step, or add prompts"
    )


def _recorded_train(run_config: Path) -> dict:
    """The `train` section of a run's config.yaml, as the run last wrote it ({} when unreadable)."""
    try:
        train = yaml.safe_load(run_config.read_text())["train"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return {}
    return train if isinstance(train, dict) else {}


def recorded_epoch_steps(run_config: Path, cfg: JobConfig) -> int | None:
    """`cfg`'s `train.total_epochs` x the steps an epoch had in the run of `run_config` (its
    config.yaml), before the prompts are read; None when the run did not count epochs, or counted
    them in steps of another `train.prompts_per_step`."""
    recorded, t = _recorded_train(run_config), cfg.train
    if (
        t.total_epochs is None
        or not recorded.get("total_epochs")
        or recorded.get("prompts_per_step") != t.prompts_per_step
    ):
        return None
    return t.total_epochs * (int(recorded.get("total_steps", 0)) // int(recorded["total_epochs"]))


def steps_recounted(run_config: Path, cfg: JobConfig) -> str | None:
    """A warning when a resumed run of epochs counts other steps than it ran with (its prompt file or
    `prompts_per_step` changed): the LR schedule's end moves with them. `run_config`: the run's
    config.yaml, as the run last wrote it; None when nothing changed or nothing tells."""
    before = _recorded_train(run_config).get("total_steps")
    if cfg.train.total_epochs is None or before is None:
        return None
    now = cfg.train.total_steps
    if before == now:
        return None
    return (
        f"train.total_epochs={cfg.train.total_epochs}: the run counted {before} steps, the training prompts give "
        f"{now} now (the prompt file or train.prompts_per_step changed); the job trains to step {now} and the "
        "learning-rate schedule ends there"
    )
