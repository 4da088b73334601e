"""The supervised-stage commands: `rlhf-cluster sft`, `train-rm` and `pipeline` (SFT, a reward
model, then RL against it), and `base_model`, the model a first stage (or `gateway`) starts from.
The stages' Ray driver is `supervised.py`; these commands are registered by `actors/commands/cli.py`."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from actors.commands import common
from actors.commands.common import (
    REPO,
    SET_HELP,
    connect,
    load_config_or_exit,
    preflight_or_exit,
    print_result,
    refuse,
    refused_input,
    run_dir_refusal,
)
from rlhf_cluster.config import JobConfig

STAGE_LABELS = {"sft": "the SFT model", "reward_model": "the reward model"}


def base_model(cfg: JobConfig) -> str:
    """The model the first stage starts from: `model.path`, or the tiny model built on first use."""
    from rlhf_cluster.job.validation import validate_model_dir
    from rlhf_cluster.models.tiny_model import ensure_tiny_model

    if cfg.model.path is not None:
        validate_model_dir(cfg.model.path)
        return cfg.model.path
    return str(ensure_tiny_model(cfg.model.tiny, cfg.model.cache_dir))


def _overwrite_option():
    """`--overwrite=aside|delete`, as `train` has it (a bare `--overwrite` is `=aside` where
    `actors/commands/cli.py` registers the command with `training.OverwriteCommand`)."""
    return typer.Option(
        None,
        "--overwrite",
        metavar="[=delete]",
        help="Start over where an earlier run's output is: it is moved aside to RUN_DIR.old-<time>; "
        "--overwrite=delete deletes it.",
    )


def _filled(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def _aside_names(cfg: JobConfig, paths: list[Path]) -> str:
    """Where `RunDir.set_aside` puts `paths`: `RUN_DIR.old-<time>` for those inside the run
    directory, `<path>.old-<time>` beside any other."""
    root = Path(os.path.abspath(Path(cfg.run_dir).expanduser()))
    names = {
        root.name if Path(os.path.abspath(p)).is_relative_to(root) else Path(os.path.abspath(p)).name for p in paths
    }
    return " and ".join(f"{name}.old-<time>" for name in sorted(names))


def clear_earlier_outputs(cfg: JobConfig, kinds: tuple[str, ...], overwrite: str | None, rl_run: bool) -> None:
    """Before any work: the stage outputs of `kinds` (and with `rl_run`, the RL stage's run in
    run_dir) that an earlier run left are refused in one line (exit code 2) without `overwrite`;
    with it they are moved aside to `RUN_DIR.old-<time>`, or deleted with 'delete', as `train
    --overwrite` does (`RunDir`). A live job holding run_dir refuses the pipeline, or a move."""
    from rlhf_cluster.run.run_dir import RunDir, overwrite_mode

    with refused_input(ValueError):
        mode = overwrite_mode(overwrite)
    busy = run_dir_refusal(cfg, "auto", None)  # only another live job's lock: nothing is fresh
    if busy is not None and rl_run:
        refuse(busy)
    run = RunDir(cfg.run_dir, cfg.weights_dir, cfg.checkpoint_dir)
    outputs = [(kind, cfg.stage_output(kind)) for kind in kinds if _filled(cfg.stage_output(kind))]
    earlier_rl = rl_run and run_dir_refusal(cfg, None, None) is not None
    stale = [path for _, path in outputs]
    if earlier_rl:
        stale += [p for p in run.artifacts(mode or "aside") if _filled(p)]
    if not stale:
        return
    items = [f"{STAGE_LABELS[kind]} {path}" for kind, path in outputs]
    items += [f"the RL stage's run in {cfg.run_dir} (metrics, checkpoints)"] if earlier_rl else []
    it = "it" if len(items) == 1 else "them"
    if mode is None:
        refuse(
            f"an earlier run's output exists: {', '.join(items)}; start over with --overwrite (moves {it} "
            f"aside to {_aside_names(cfg, stale)}; --overwrite=delete deletes {it})"
        )
    if busy is not None:
        refuse(busy)
    if mode == "delete":
        RunDir.delete_paths(stale)
        typer.echo(f"deleted the earlier run's output: {', '.join(items)}", err=True)
    else:
        aside = run.set_aside(stale)
        typer.echo(f"moved the earlier run's output aside to {aside} (nothing deleted): {', '.join(items)}", err=True)


def _stage_line(summary: dict) -> str:
    if summary["stage"] == "sft":
        nll, accuracy = summary.get("eval_nll", float("nan")), summary.get("eval_token_accuracy", float("nan"))
        detail = f"held-out NLL {nll:.3f}, token accuracy {accuracy:.3f}"
    else:
        detail = (
            f"held-out pairwise accuracy {summary.get('eval_pairwise_accuracy', float('nan')):.3f}, "
            f"reward/length correlation {summary.get('eval_length_correlation', float('nan')):+.3f}"
        )
    loss = f"loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}"
    return f"{summary['stage']}: {loss}, {detail}; model in {summary['output']}"


def _run_stage_command(
    config: Path,
    set_: list[str],
    address: str | None,
    kind: str,
    start_from_sft: bool,
    overwrite: str | None,
    debug: bool,
) -> None:
    import ray

    from actors.commands.supervised import run_stage

    cfg = load_config_or_exit(config, set_)
    if getattr(cfg, kind) is None:
        refuse(f"{config} has no `{kind}` section (see configs/three_stage.yaml)")
    clear_earlier_outputs(cfg, (kind,), overwrite, rl_run=False)
    sft_out = cfg.stage_output("sft")
    base = str(sft_out) if start_from_sft and (sft_out / "config.json").is_file() else base_model(cfg)
    connect(address or cfg.cluster.address, cfg.cluster.num_cpus)
    try:
        summary = run_stage(cfg, kind, base, progress=cfg.train.progress)
    except Exception as exc:
        common.exit_on_input_error(exc, debug)
        raise
    finally:
        ray.shutdown()
    typer.echo(_stage_line(summary))


def _stage_command(name: str, kind: str, section_help: str, start_from_sft: bool, doc: str):
    """The command that trains one supervised stage (`kind`, the config section it reads)."""

    def command(
        config: Path = typer.Argument(..., help=section_help),
        address: str | None = typer.Option(None, help="Ray address; empty starts a local instance."),
        set_: list[str] = typer.Option([], "--set", help=SET_HELP),
        overwrite: str | None = _overwrite_option(),
        debug: bool = common.debug_option(),
    ) -> None:
        _run_stage_command(config, set_, address, kind, start_from_sft, overwrite, debug)

    command.__name__, command.__doc__ = name, doc
    return command


sft = _stage_command(
    "sft",
    "sft",
    "YAML job config with an `sft` section.",
    start_from_sft=False,
    doc="Supervised fine-tuning of the config's model on prompt/response data (loss on response tokens only).",
)
train_rm = _stage_command(
    "train_rm",
    "reward_model",
    "YAML job config with a `reward_model` section.",
    start_from_sft=True,
    doc="Train a reward model (Bradley-Terry on preference pairs), starting from the SFT model if one was trained.",
)


def pipeline(
    config: Path = typer.Argument(
        REPO / "configs" / "three_stage.yaml", help="YAML job config with `sft` and `reward_model` sections."
    ),
    address: str | None = typer.Option(None, help="Ray address; empty starts a local instance."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    overwrite: str | None = _overwrite_option(),
    debug: bool = common.debug_option(),
) -> None:
    """All three RLHF stages: SFT, a reward model, then RL against it; prints the verifier's accuracy after each."""
    import ray

    from actors.commands.supervised import run_stage
    from actors.job import run_job
    from rlhf_cluster.config import RewardModelSpec

    cfg = load_config_or_exit(config, set_)
    if cfg.sft is None or cfg.reward_model is None:
        refuse(f"{config} needs both an `sft` and a `reward_model` section")
    preflight_or_exit(cfg)  # the RL stage's rules, before hours of SFT and reward-model training
    clear_earlier_outputs(cfg, ("sft", "reward_model"), overwrite, rl_run=True)
    connect(address or cfg.cluster.address, cfg.cluster.num_cpus)
    try:
        sft_summary = run_stage(cfg, "sft", base_model(cfg), progress=cfg.train.progress)
        typer.echo(_stage_line(sft_summary))
        rm_summary = run_stage(cfg, "reward_model", sft_summary["output"], progress=cfg.train.progress)
        typer.echo(_stage_line(rm_summary))
        # RL starts from the SFT policy (also the reference) and is rewarded by the trained reward model.
        model = cfg.model.model_copy(update={"path": sft_summary["output"], "sft_warmup_steps": 0})
        scoring = cfg.scoring
        if scoring.model_source is None or not scoring.model_source.models:
            scoring = scoring.with_reward_models([RewardModelSpec(path=rm_summary["output"], name="rm")])
        rl = cfg.model_copy(update={"model": model, "scoring": scoring})
        result = run_job(rl, overwrite=overwrite)
    except Exception as exc:
        common.exit_on_input_error(exc, debug)
        raise
    finally:
        ray.shutdown()
    print_result(rl, result)
    lines = [
        ("after SFT (greedy, verifier)", result.accuracy_before),
        ("after SFT (sampled, verifier)", result.sampled_accuracy_before),
        ("reward model: held-out pairwise accuracy", rm_summary.get("eval_pairwise_accuracy")),
        ("after RL against the reward model (greedy, verifier)", result.accuracy_after),
        ("after RL against the reward model (sampled, verifier)", result.sampled_accuracy_after),
    ]
    typer.echo("three stages:")
    for label, value in lines:
        if value is not None:
            typer.echo(f"  {label:<55} {value:.3f}")
