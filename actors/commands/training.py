"""`rlhf-cluster train`: an RL job run here or on a cluster, its `--dry-run` (config, preflight and
placement checked, nothing started) and `--max-retries` (the driver run as a supervised child).
Registered by `actors/commands/cli.py`, with `OverwriteCommand` as its command class."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import typer
from typer.core import TyperCommand

from actors.commands.common import (
    DEFAULT_CONFIG,
    SET_HELP,
    cluster_capacity,
    connect,
    debug_option,
    exit_on_input_error,
    load_config_or_exit,
    preflight_or_exit,
    print_result,
    refuse,
    run_dir_refusal,
)
from rlhf_cluster.config import ConfigError, JobConfig
from rlhf_cluster.job.preflight import preflight


def _dry_run(cfg: JobConfig, address: str | None, resume: str | None, overwrite: str | None) -> None:
    from rlhf_cluster.job.placement import check_placement, format_plan, resource_plan
    from rlhf_cluster.job.preview import preview

    problems: list[str] = []
    warnings: list[str] = []
    try:
        warnings = preflight(cfg, resume=resume)
    except ConfigError as exc:
        problems.append(str(exc))
    if (busy := run_dir_refusal(cfg, resume, overwrite)) is not None:
        warnings.append(busy)  # as things stand: that job may end, or the run be given --overwrite
    # Placement needs the cluster's capacity, so it is the dry run's own check, not preflight's.
    plan = resource_plan(cfg)
    problems += check_placement(plan, cluster_capacity(address, cfg))
    typer.echo(format_plan(plan))
    steps: int | None = None
    if not problems:  # the inputs are readable: show them as the engine will see them
        try:
            shown = preview(cfg)
        except ValueError as exc:  # what the job's start would refuse on its prompts
            problems.append(str(exc))
        else:
            for line in shown.lines:
                typer.echo(line)
            steps, warnings = shown.total_steps, [*warnings, *shown.warnings]
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)
    if problems:
        refuse(*problems)
    if (resumed := _resume_line(cfg, resume)) is not None:
        typer.echo(resumed)
    epochs = cfg.train.total_epochs
    if steps is None:  # a user's file on a model not built yet
        counted = f"train.total_epochs={epochs} (steps counted from the training prompts at the job's start)"
    else:
        counted = f"{steps} steps" + (f" (train.total_epochs={epochs})" if epochs is not None else "")
    typer.echo(f"dry run ok: {cfg.name}, {counted}, {cfg.samples_per_step} samples per step")


class OverwriteCommand(TyperCommand):
    """The command class of `train`, `sft`, `train-rm` and `pipeline`: `--overwrite` alone means
    `--overwrite=aside` (Typer has no options whose value may be left out), so `make run`'s bare
    `--overwrite` keeps working beside `--overwrite=delete`."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, ["--overwrite=aside" if a == "--overwrite" else a for a in args])


def train(
    config: Path = typer.Argument(DEFAULT_CONFIG, help="YAML job config."),
    address: str | None = typer.Option(
        None, help="Ray address of an existing cluster ('auto' inside a Ray job); empty starts a local instance."
    ),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Validate the config and check the cluster can place every pool; start nothing."
    ),
    resume: str | None = typer.Option(
        None, help="Continue from a checkpoint: 'auto' (the newest that verifies) or its path."
    ),
    overwrite: str | None = typer.Option(
        None,
        "--overwrite",
        metavar="[=delete]",
        help="Start over in a run_dir that holds an earlier run: its files are moved aside to RUN_DIR.old-<time>; "
        "--overwrite=delete deletes them.",
    ),
    debug: bool = debug_option(),
    max_retries: int = typer.Option(
        0,
        "--max-retries",
        min=0,
        help="Run the driver as a child and resume it (--resume auto) after it dies, up to this many times.",
    ),
    record_rollouts: bool = typer.Option(
        False, "--record-rollouts", help="Keep every scored group (RUN_DIR/scored) for `rlhf-cluster replay`."
    ),
) -> None:
    """Run an RL job: generation, scoring, learner and weight store on Ray."""
    set_ = [*set_, *(["train.record_rollouts=true"] if record_rollouts else [])]
    cfg = load_config_or_exit(config, set_)
    if overwrite not in (None, "aside", "delete"):
        refuse(
            f"--overwrite={overwrite}: expected --overwrite (moves the earlier run aside) or "
            "--overwrite=delete (deletes it)"
        )
    given_address, address = address, address or cfg.cluster.address
    if dry_run:
        _dry_run(cfg, address, resume, overwrite)
        return
    # A refusal ends here, before Ray starts; the driver runs both checks again (and logs the warnings).
    preflight_or_exit(cfg, resume=resume)
    if (busy := run_dir_refusal(cfg, resume, overwrite)) is not None:
        refuse(busy)
    _exit_if_complete(cfg, resume)
    if max_retries:
        from actors.commands.supervisor import supervise

        argv = _child_argv(config, set_, address, resume, overwrite, debug)
        raise typer.Exit(supervise(argv, max_retries, lambda line: typer.echo(line, err=True)))
    _run_here(cfg, _resume_command(config, set_, given_address), address, resume, overwrite, debug)


def _exit_if_complete(cfg: JobConfig, resume: str | None) -> None:
    """A resume from a checkpoint of the run's last step has nothing to train: say so and end
    (exit code 0) before Ray or any pool starts."""
    if (complete := _complete(cfg, resume)) is not None:
        typer.echo(complete)
        raise typer.Exit(0)


def _complete(cfg: JobConfig, resume: str | None) -> str | None:
    """Why a resume has nothing to train (its checkpoint holds the run's last step), or None. With
    `train.total_epochs` the last step is the run's own count (its config.yaml: the steps an epoch
    had at its start) times the epochs asked for."""
    from rlhf_cluster.job.epochs import recorded_epoch_steps
    from rlhf_cluster.run.run_dir import RunDir

    run = RunDir(cfg.run_dir, cfg.weights_dir, cfg.checkpoint_dir)
    epochs = cfg.train.total_epochs
    total = cfg.train.total_steps if epochs is None else recorded_epoch_steps(run.root / RunDir.CONFIG, cfg)
    ckpt = run.complete(resume, total) if total is not None else None
    if ckpt is None or total is None:
        return None
    done = ckpt.step + 1
    field, value = ("train.total_steps", total) if epochs is None else ("train.total_epochs", epochs)
    return (
        f"run_dir {run.root}: the run is already complete: "
        f"{f'{done} of {total}' if done == total else done} steps trained ({ckpt.path.name})"
        f"{'' if done == total else f', {field} is {value}'}; "
        f"nothing to train. To train further, raise {field} with --set, e.g. "
        f"--set {field}={2 * (done if epochs is None else epochs)} --resume auto"
    )


def _resume_line(cfg: JobConfig, resume: str | None) -> str | None:
    """What the dry run says of `--resume`: a run with nothing left to train, or `auto` with no
    checkpoint (the job starts over, the earlier files moved aside)."""
    from rlhf_cluster.run.checkpoint import CheckpointStore

    if resume is None:
        return None
    if (complete := _complete(cfg, resume)) is not None:
        return complete
    if resume == "auto" and not CheckpointStore(cfg.checkpoint_dir).candidates():
        return f"--resume auto: no checkpoint in {cfg.checkpoint_dir}: the job starts over (earlier files moved aside)"
    return None


def _child_argv(
    config: Path, set_: list[str], address: str | None, resume: str | None, overwrite: str | None, debug: bool
) -> list[str]:
    """The command line of the supervised child (`--max-retries`): this `train` without it."""
    return [
        sys.executable,
        "-m",
        "actors.commands.cli",
        "train",
        str(config),
        *(f"--set={s}" for s in set_),
        *(["--address", address] if address else []),
        *(["--resume", resume] if resume else []),
        *([f"--overwrite={overwrite}"] if overwrite else []),
        *(["--debug"] if debug else []),
    ]


def _resume_command(config: Path, set_: list[str], address: str | None) -> str:
    """The shell command that continues this run (`--resume auto`): the same config, every
    `--set` (so the same run_dir and settings) and the `--address` given, each word quoted."""
    from actors.commands.jobs import RESUME_HINT

    if submitted := os.environ.get(RESUME_HINT):  # a job of `submit`: its user resubmits, from their own config
        return submitted
    words = ["rlhf-cluster", "train", str(config), *(w for s in set_ for w in ("--set", s))]
    words += [*(["--address", address] if address else []), "--resume", "auto"]
    return shlex.join(words)


def _run_here(
    cfg: JobConfig, resume_command: str, address: str | None, resume: str | None, overwrite: str | None, debug: bool
) -> None:
    """Run the job in this process on Ray (started here, or `address`'s) and print its result; a
    stop (SIGTERM, preemption) ends it with a checkpoint and says how to continue (`resume_command`)."""
    import ray

    from actors.job import run_job
    from rlhf_cluster.job.preemption import GracefulStop

    try:
        connect(address, cfg.cluster.num_cpus)
        # After ray.init, which installs its own SIGTERM handler (a stack dump, then exit 15).
        with GracefulStop(cfg.faults.preempt_grace_s) as stop:
            result = run_job(cfg, resume, stop, overwrite)
    except KeyboardInterrupt as exc:
        typer.echo(
            f"error: {exc or 'interrupted'}; the job was torn down without a final checkpoint "
            f"(continue from the newest one with: {resume_command})",
            err=True,
        )
        raise typer.Exit(130) from None
    except Exception as exc:
        exit_on_input_error(exc, debug)
        raise
    finally:
        ray.shutdown()
    print_result(cfg, result)
    if result.stopped:
        why = f" by {stop.received}" if stop.received else ""
        done = result.rows[-1]["step"] + 1 if result.rows else 0
        typer.echo(
            f"stopped{why} after {done} of {result.total_steps or cfg.train.total_steps} steps, with a checkpoint; "
            f"continue with: {resume_command}"
        )
