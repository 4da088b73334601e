"""Commands that read a run directory: `plot`, `samples`, `trace`, `replay`, and `status` of a run
directory (registered by actors/commands/cli.py)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from actors.commands.common import refuse, refused_input

# A missing or malformed file of the run directory ends a command with its one-line message (exit 2).
RUN_FILE_ERRORS = (FileNotFoundError, ValueError)


def run_status(run_dir: Path) -> None:
    """Print a run directory's progress, held-out accuracy, checkpoints and guardrail actions."""
    from rlhf_cluster.run.status import describe_run

    with refused_input(*RUN_FILE_ERRORS):
        typer.echo("\n".join(describe_run(run_dir)))


def plot(
    run_dir: Path = typer.Argument(..., help="A run directory (holds metrics.jsonl)."),
    out: Path | None = typer.Option(None, help="PNG to write (default RUN_DIR/metrics.png)."),
) -> None:
    """Plot reward, KL, response length and held-out accuracy per step to a PNG."""
    from rlhf_cluster.telemetry.plotting import plot_run

    with refused_input(*RUN_FILE_ERRORS):
        typer.echo(str(plot_run(run_dir, out)))


def samples(
    run_dir: Path = typer.Argument(..., help="A run directory (holds samples.jsonl)."),
    step: int | None = typer.Option(None, help="The step to show (default: the last one logged)."),
    top: int | None = typer.Option(
        None, min=0, help="Show only this many of the highest- and lowest-reward ones (0: only the random ones)."
    ),
) -> None:
    """Print the decoded prompts and responses a step trained on: highest and lowest reward, random."""
    from rlhf_cluster.fileio import read_jsonl
    from rlhf_cluster.run.run_dir import RunDir
    from rlhf_cluster.run.sample_log import fewest_extremes, format_samples

    rows = read_jsonl(run_dir / RunDir.SAMPLES).rows  # none if absent; a torn final line is left out
    if not rows:
        refuse(f"{run_dir / RunDir.SAMPLES}: no samples logged (is this a run directory?)")
    step = rows[-1]["step"] if step is None else step
    chosen = [r for r in rows if r["step"] == step]
    if not chosen:
        refuse(f"no samples of step {step} (logged: steps {rows[0]['step']}..{rows[-1]['step']})")
    if top is not None:
        chosen = fewest_extremes(chosen, top)
    typer.echo(format_samples(chosen))


def trace(
    run_dir: Path = typer.Argument(..., help="A run directory (holds trace.jsonl)."),
    steps: str | None = typer.Option(None, help="A:B (steps A to B) or A; default: the whole run."),
    out: Path | None = typer.Option(None, help="JSON to write (default RUN_DIR/trace.json)."),
    png: Path | None = typer.Option(None, help="Also draw the trace to this PNG (one row per track)."),
) -> None:
    """Write the run's step trace as Chrome/Perfetto trace-event JSON (open it in ui.perfetto.dev)."""
    from rlhf_cluster.run.run_dir import RunDir
    from rlhf_cluster.telemetry.tracing import parse_steps, read_spans, write_trace

    with refused_input(*RUN_FILE_ERRORS):
        path = write_trace(read_spans(run_dir / RunDir.TRACE), out or run_dir / "trace.json", parse_steps(steps))
    typer.echo(str(path))
    if png is not None:
        from rlhf_cluster.telemetry.plotting import plot_trace

        with refused_input(*RUN_FILE_ERRORS):
            drawn = plot_trace(json.loads(path.read_text()), png, f"{run_dir.name}: steps {steps or 'all'}")
        typer.echo(str(drawn))


def replay(
    run_dir: Path = typer.Argument(..., help="The run directory of a job run with --record-rollouts."),
    steps: str | None = typer.Option(
        None, help="A:B (steps A to B; A > 0 starts from the run's checkpoint of step A-1); default: all."
    ),
    out: Path | None = typer.Option(None, help="Where the replay writes (default RUN_DIR/replay)."),
    address: str | None = typer.Option(None, help="Ray address; empty starts a local instance."),
) -> None:
    """Train a recorded run's steps again from its recorded groups (no generation); print each
    rank's state digest and whether it equals the run's checkpoint at the last step."""
    import ray

    from actors.commands.replay import replay as run_replay
    from rlhf_cluster.telemetry.tracing import parse_steps

    with refused_input(*RUN_FILE_ERRORS):
        window = parse_steps(steps)
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
        try:
            result = run_replay(run_dir, out or run_dir / "replay", window)
        finally:
            ray.shutdown()
    first, last = result["steps"]
    typer.echo(f"replayed steps {first}..{last}")
    for rank, digest in enumerate(result["rank_digests"]):
        typer.echo(f"rank {rank}: {digest}")
    if result["run_rank_digests"] is not None:
        same = result["run_rank_digests"] == result["rank_digests"]
        typer.echo(f"the run's checkpoint of step {last}: {'identical' if same else 'DIFFERENT'}")
