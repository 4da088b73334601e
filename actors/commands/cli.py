"""`rlhf-cluster` command line: the Typer app and every command registered on it, in the order
`--help` lists them. The commands themselves live beside it: `training` (`train`), `stages` (`sft`,
`train-rm`, `pipeline`), `jobs` (`submit`, `status`, `logs`, `stop`, `scale`), `run_views`
(`plot`, `samples`, `trace`, `replay`) and `tinker` (`tinker`); `gateway` and `version` are here.
None of them imports this module: it imports them."""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

import typer

from actors.commands import export, jobs, run_views, stages, tinker, training
from actors.commands.common import DEFAULT_CONFIG, REPO, load_config_or_exit, refuse, refuse_a_taken_port
from rlhf_cluster.telemetry.console import attach_console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Decoupled, distributed RLHF on Ray.")


@app.callback()
def _before_any_command() -> None:
    # Ray turns on token auth when ~/.ray/auth_token exists, and reads RAY_AUTH_MODE once, when
    # it is imported: say so before any command imports it (`scale` did first, and was refused).
    if (Path.home() / ".ray" / "auth_token").exists():
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    attach_console()  # what the job and its actors log reaches this console, above the progress bars
    # A config's `module:function` (a reward function, a loss) names a module beside you, found first as
    # `python -m` finds one; a console script's sys.path lacks the working directory (Ray gives it to the
    # workers of a job it starts from here: `ray.init` adds the driver's working directory to theirs).
    try:
        here = os.getcwd()
    except FileNotFoundError:  # a working directory deleted under the shell: nothing to find there
        here = None
    if here is not None and here not in sys.path:
        sys.path.insert(0, here)


# A bare `--overwrite` means `--overwrite=aside` for every command that takes one (`OverwriteCommand`).
app.command(cls=training.OverwriteCommand)(training.train)
app.command(cls=training.OverwriteCommand)(stages.sft)
app.command("train-rm", cls=training.OverwriteCommand)(stages.train_rm)
app.command(cls=training.OverwriteCommand)(stages.pipeline)
# ---- jobs on a cluster (Ray Jobs API) ---------------------------------------------------------
app.command(cls=training.OverwriteCommand)(jobs.submit)
for command in (jobs.status, jobs.logs, jobs.stop, jobs.scale):
    app.command()(command)


@app.command()
def gateway(
    config: Path = typer.Argument(
        DEFAULT_CONFIG, exists=True, dir_okay=False, help="YAML job config (its model and generation settings)."
    ),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a config field: --set generation.sampling.max_new_tokens=256"
    ),
    host: str = typer.Option("127.0.0.1", help="Address to bind (anything but loopback needs --token)."),
    port: int = typer.Option(8000, help="Port (0: any free one; the URL is printed)."),
    token: str | None = typer.Option(None, help="Bearer token every call must carry."),
    out: Path | None = typer.Option(None, help="Where closed episodes go (default: <run_dir>/gateway/episodes.jsonl)."),
) -> None:
    """Serve the agent gateway (OpenAI-compatible, token-exact episode traces) over the config's
    model on this machine, without training; Ctrl-C stops it."""
    from rlhf_cluster.config.episodes import is_loopback
    from rlhf_cluster.gateway.standalone import serve

    cfg = load_config_or_exit(config, set_)
    if not is_loopback(host) and not token:
        refuse(f"--host {host} is reachable from other machines: set --token")
    refuse_a_taken_port(host, port, "--port N (0: any free one)")
    out = out or Path(cfg.run_dir) / "gateway" / "episodes.jsonl"
    if cfg.model.sft_warmup_steps:  # trial 23b G1: what a job trains from is its warm-up, not this
        typer.echo(
            f"warning: the gateway serves the base model; a job of this config starts from its supervised warm-up "
            f"(model.sft_warmup_steps={cfg.model.sft_warmup_steps}), which the gateway does not run",
            err=True,
        )
    serve(
        cfg,
        stages.base_model(cfg),
        host,
        port,
        token,
        out,
        on_ready=lambda url: typer.echo(
            f"gateway: {url}/v1 (episodes: {url}/episodes/<id>/v1); closed episodes -> {out}"
        ),
    )


app.command()(tinker.tinker)
app.command()(export.export)  # a run's policy as a Hugging Face folder


for view in (run_views.plot, run_views.samples, run_views.trace, run_views.replay):
    app.command()(view)


@app.command()
def version() -> None:
    """Print the package version."""
    from importlib.metadata import version as v

    typer.echo(v("rlhf-cluster"))


def reflow(doc: str) -> str:
    """`doc` with each paragraph on one line: a docstring's hard line breaks would otherwise survive
    into the summary `--help` lists for each command (Typer's rich mode keeps single newlines there)."""
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(
        p if p.startswith("\b") else " ".join(line.strip() for line in p.split("\n")) for p in paragraphs
    )


def _tidy_help(typer_app: typer.Typer) -> None:
    """Every registered command's help reflowed (`reflow`), and a default path inside the repository
    shown relative to it (`configs/demo.yaml`, not the install's absolute path; the absolute path is
    still what is loaded)."""
    for info in typer_app.registered_commands:
        if info.callback is None:
            continue
        doc = info.help or inspect.getdoc(info.callback)
        if doc:
            info.help = reflow(doc)
        for param in inspect.signature(info.callback).parameters.values():
            spec = param.default
            default = getattr(spec, "default", None)
            if isinstance(default, Path) and default.is_relative_to(REPO) and spec.show_default is True:
                spec.show_default = str(default.relative_to(REPO))


_tidy_help(app)


if __name__ == "__main__":
    app()
