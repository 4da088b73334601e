"""`rlhf-cluster tinker CONFIG`: serve the Tinker training API (the `tinker` SDK's training and
sampling clients, unmodified) on this cluster's learner ranks and vLLM engines
(`actors/workers/tinker.py`). Ray is imported only once the command runs (the CLI's callback sets
Ray's auth mode first)."""

from __future__ import annotations

from pathlib import Path

import typer

from actors.commands.common import refuse, refuse_a_taken_port, refused_input
from rlhf_cluster.config.base import ConfigError
from rlhf_cluster.config.loading import load_model
from rlhf_cluster.config.tinker import TinkerConfig, check_context_length


def tinker(
    config: Path | None = typer.Argument(
        None, exists=True, dir_okay=False, help="The server's YAML (default: all defaults)."
    ),
    set_: list[str] = typer.Option([], "--set", help="Override a config field: --set lora.max_clients=4"),
) -> None:
    """Serve the Tinker training API over one base model: LoRA training clients on the learner ranks,
    sampling on vLLM engines; clients set TINKER_BASE_URL to the printed URL and TINKER_API_KEY to
    the token. Ctrl-C (or SIGTERM) stops it; saved states stay in `state_dir`."""
    from actors.workers.tinker import model_folder, serve

    with refused_input(ConfigError):
        cfg = load_model(TinkerConfig, config, set_)
    try:
        cfg.api_key()
    except ValueError as exc:
        refuse(str(exc), hint="set `token: tml-...` in the config or export the variable it names")
    with refused_input(ConfigError, ValueError):  # no model folder, or a context longer than it accepts
        check_context_length(cfg.model, model_folder(cfg))
    refuse_a_taken_port(cfg.host, cfg.port, "--set port=N (0: any free one)")
    name, state = cfg.model.name, cfg.state_dir
    try:
        serve(cfg, on_ready=lambda url: typer.echo(f"tinker: serving {name} at {url} (state: {state})"))
    except KeyboardInterrupt:  # Ctrl-C while starting, before the server's own handler is set
        typer.echo(f"tinker: stopped while starting; saved states stay in {cfg.state_dir}")
        raise typer.Exit(130) from None
    typer.echo(f"tinker: stopped; saved states stay in {cfg.state_dir}")
