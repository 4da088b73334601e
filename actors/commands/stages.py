"""The supervised-stage commands: `rlhf-cluster sft`, `train-rm` and `pipeline` (SFT, a reward
model, then RL against it), and `base_model`, the model a first stage (or `gateway`) starts from.
The stages' Ray driver is `supervised.py`; these commands are registered by `actors/commands/cli.py`."""

from __future__ import annotations

from pathlib import Path

import typer

from actors.commands.common import REPO, connect, load_config_or_exit, preflight_or_exit, print_result, refuse
from rlhf_cluster.config import JobConfig


def base_model(cfg: JobConfig) -> str:
    """The model the first stage starts from: `model.path`, or the tiny model built on first use."""
    from rlhf_cluster.job.validation import validate_model_dir
    from rlhf_cluster.models.tiny_model import ensure_tiny_model

    if cfg.model.path is not None:
        validate_model_dir(cfg.model.path)
        return cfg.model.path
    return str(ensure_tiny_model(cfg.model.tiny, cfg.model.cache_dir))


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


def _run_stage_command(config: Path, set_: list[str], address: str | None, kind: str, start_from_sft: bool) -> None:
    import ray

    from actors.commands.supervised import run_stage

    cfg = load_config_or_exit(config, set_)
    if getattr(cfg, kind) is None:
        refuse(f"{config} has no `{kind}` section (see configs/three_stage.yaml)")
    sft_out = cfg.stage_output("sft")
    base = str(sft_out) if start_from_sft and (sft_out / "config.json").is_file() else base_model(cfg)
    connect(address or cfg.cluster.address, cfg.cluster.num_cpus)
    try:
        summary = run_stage(cfg, kind, base, progress=cfg.train.progress)
    finally:
        ray.shutdown()
    typer.echo(_stage_line(summary))


def _stage_command(name: str, kind: str, section_help: str, start_from_sft: bool, doc: str):
    """The command that trains one supervised stage (`kind`, the config section it reads)."""

    def command(
        config: Path = typer.Argument(..., help=section_help),
        address: str | None = typer.Option(None, help="Ray address; empty starts a local instance."),
        set_: list[str] = typer.Option([], "--set", help="Override a field: section.field=value (repeatable)."),
    ) -> None:
        _run_stage_command(config, set_, address, kind, start_from_sft=start_from_sft)

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
    set_: list[str] = typer.Option([], "--set", help="Override a field: section.field=value (repeatable)."),
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
        result = run_job(rl)
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
