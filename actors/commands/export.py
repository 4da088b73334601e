"""`rlhf-cluster export`: a run's trained policy as a Hugging Face folder (registered by
actors/commands/cli.py; the work is rlhf_cluster/weights/export.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from actors.commands.common import refused_input


def export(
    run_dir: Path = typer.Argument(..., help="A run directory (holds config.yaml and the weight store)."),
    out: Path = typer.Option(..., "--out", help="The folder to write (refused if not empty, unless --overwrite)."),
    version: int | None = typer.Option(
        None, "--version", min=0, help="The weight version to export (default: the newest the store holds)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an earlier export in --out (never a folder of other files)."
    ),
) -> None:
    """Write a run's trained policy (a weight version of its store) as a Hugging Face folder: config,
    tokenizer and safetensors, which transformers' from_pretrained and `vllm serve` load."""
    from rlhf_cluster.weights.export import export_policy, exported_version
    from rlhf_cluster.weights.store import WeightIntegrityError

    with refused_input(FileNotFoundError, ValueError, WeightIntegrityError):
        written = export_policy(run_dir, out, version, overwrite=overwrite)
    typer.echo(f"exported weight version {exported_version(written)} of {run_dir} to {written}")
