"""`rlhf-cluster` command line: train a job on a local or existing Ray cluster."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from rlhf_cluster.config import ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Decoupled, distributed RLHF on Ray.")

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


@app.command()
def train(
    config: Path = typer.Argument(DEFAULT_CONFIG, help="YAML job config."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; empty starts a local Ray instance."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: section.field=value (repeatable)."),
) -> None:
    """Run an RL job: generation, scoring, learner and weight store on Ray."""
    try:
        cfg = load_config(config, set_)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    if address:
        cfg.cluster.address = address

    import ray

    from actors.driver import run_job

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=cfg.cluster.num_cpus, include_dashboard=False, log_to_driver=True)
    try:
        result = run_job(cfg)
    finally:
        ray.shutdown()
    last = result.rows[-1]
    typer.echo(
        f"done: {len(result.rows)} steps, weight version {result.final_version}, "
        f"final reward {last['reward_mean']:.3f}; metrics in {result.run_dir}/metrics.jsonl"
    )


@app.command()
def version() -> None:
    """Print the package version."""
    from importlib.metadata import version as v

    typer.echo(v("rlhf-cluster"))


def main() -> None:  # pragma: no cover
    sys.exit(app())
