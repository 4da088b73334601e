"""`rlhf-cluster` command line: train locally or on a cluster, submit and follow jobs, scale pools."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import typer
from typer.core import TyperCommand

from actors.commands import run_views
from actors.commands.submission import job_client, stage_working_dir
from rlhf_cluster.config import ConfigError, JobConfig, load_config
from rlhf_cluster.job.preflight import preflight
from rlhf_cluster.telemetry.console import attach_console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Decoupled, distributed RLHF on Ray.")


@app.callback()
def _before_any_command() -> None:
    # Ray turns on token auth when ~/.ray/auth_token exists, and reads RAY_AUTH_MODE once, when
    # it is imported: say so before any command imports it (`scale` did first, and was refused).
    if (Path.home() / ".ray" / "auth_token").exists():
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    attach_console()  # what the job and its actors log reaches this console, above the progress bars


REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "demo.yaml"
ADDRESS_HELP = "Ray address: ray://HOST:10001 or HOST:6379 for train/scale, http://HEAD:8265 for job commands."


def _load(config: Path, overrides: list[str]) -> JobConfig:
    try:
        return load_config(config, overrides)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _connect(address: str | None, num_cpus: int | None = None) -> None:
    import ray

    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # "local" always starts a new instance, never attaching to another cluster on the machine.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def _capacity(address: str | None, cfg: JobConfig) -> list[dict[str, float]]:
    """The resources of every live node (this machine for a local instance)."""
    if address is None:
        import torch

        return [{"CPU": float(cfg.cluster.num_cpus or os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]
    import ray

    _connect(address)
    try:
        return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    finally:
        ray.shutdown()


def _preflight(cfg: JobConfig, files: bool = True, resume: str | None = None) -> list[str]:
    """`preflight`'s warnings; its refusal ends the command with the message (exit code 2)."""
    try:
        return preflight(cfg, files=files, resume=resume)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _dry_run(cfg: JobConfig, address: str | None, resume: str | None) -> None:
    from rlhf_cluster.job.placement import check_placement, format_plan, resource_plan
    from rlhf_cluster.job.preview import preview_lines

    problems, warnings = [], []
    try:
        warnings = preflight(cfg, resume=resume)
    except ConfigError as exc:
        problems.append(str(exc))
    # Placement needs the cluster's capacity, so it is the dry run's own check, not preflight's.
    plan = resource_plan(cfg)
    problems += check_placement(plan, _capacity(address, cfg))
    typer.echo(format_plan(plan))
    if not problems:  # the inputs are readable: show them as the engine will see them
        for line in preview_lines(cfg):
            typer.echo(line)
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)
    if problems:
        for problem in problems:
            typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"dry run ok: {cfg.name}, {cfg.train.total_steps} steps, {cfg.samples_per_step} samples per step")


class _TrainCommand(TyperCommand):
    """`train`'s command: `--overwrite` alone means `--overwrite=aside` (Typer has no options whose
    value may be left out), so `make run`'s bare `--overwrite` keeps working beside `--overwrite=delete`."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, ["--overwrite=aside" if a == "--overwrite" else a for a in args])


@app.command(cls=_TrainCommand)
def train(
    config: Path = typer.Argument(DEFAULT_CONFIG, help="YAML job config."),
    address: str | None = typer.Option(
        None, help="Ray address of an existing cluster ('auto' inside a Ray job); empty starts a local instance."
    ),
    set_: list[str] = typer.Option([], "--set", help="Override a field: section.field=value (repeatable)."),
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
    debug: bool = typer.Option(
        False,
        "--debug",
        help="Show the full traceback of an error caused by input (config, files, reward code, checkpoints).",
    ),
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
    cfg = _load(config, set_)
    if overwrite not in (None, "aside", "delete"):
        typer.echo(
            f"error: --overwrite={overwrite}: expected --overwrite (moves the earlier run aside) or "
            "--overwrite=delete (deletes it)",
            err=True,
        )
        raise typer.Exit(2) from None
    address = address or cfg.cluster.address
    if dry_run:
        _dry_run(cfg, address, resume)
        return
    _preflight(
        cfg, resume=resume
    )  # a refusal ends here, before Ray starts; the driver runs it again and logs the warnings
    if max_retries:
        from actors.commands.supervisor import supervise

        argv = [
            sys.executable,
            "-m",
            "actors.cli",
            "train",
            str(config),
            *(f"--set={s}" for s in set_),
            *(["--address", address] if address else []),
            *(["--resume", resume] if resume else []),
            *([f"--overwrite={overwrite}"] if overwrite else []),
            *(["--debug"] if debug else []),
        ]
        raise typer.Exit(supervise(argv, max_retries, lambda line: typer.echo(line, err=True)))
    import ray

    from actors.job import run_job
    from rlhf_cluster.job.preemption import GracefulStop

    try:
        _connect(address, cfg.cluster.num_cpus)
        # After ray.init, which installs its own SIGTERM handler (a stack dump, then exit 15).
        with GracefulStop(cfg.faults.preempt_grace_s) as stop:
            result = run_job(cfg, resume, stop, overwrite)
    except KeyboardInterrupt as exc:
        typer.echo(
            f"error: {exc or 'interrupted'}; the job was torn down without a final checkpoint "
            f"(continue from the newest one with --resume auto)",
            err=True,
        )
        raise typer.Exit(130) from None
    except Exception as exc:
        _exit_on_input_error(exc, debug)
        raise
    finally:
        ray.shutdown()
    _print_result(cfg, result)
    if result.stopped:
        why = f" by {stop.received}" if stop.received else ""
        done = result.rows[-1]["step"] + 1 if result.rows else 0
        typer.echo(
            f"stopped{why} after step {done} of {cfg.train.total_steps}, with a checkpoint; "
            f"continue with: rlhf-cluster train {config} --resume auto"
        )


def _exit_on_input_error(exc: BaseException, debug: bool) -> None:
    """An error caused by the user's input ends the command with its one-line message (exit 2);
    anything else, or with --debug, keeps its traceback."""
    from rlhf_cluster.run.checkpoint import CheckpointError
    from rlhf_cluster.run.lock import RunDirBusy
    from rlhf_cluster.run.run_dir import RunDirInUse
    from rlhf_cluster.scoring.rewards import RewardFunctionError
    from rlhf_cluster.weights import WeightIntegrityError

    cause = getattr(exc, "cause", None) or exc  # a remote task's error arrives wrapped by Ray
    input_errors = (
        ValueError,
        FileNotFoundError,
        RunDirBusy,
        RunDirInUse,
        CheckpointError,
        RewardFunctionError,
        WeightIntegrityError,
    )
    if debug or not isinstance(cause, input_errors):
        return
    typer.echo(f"error: {cause}", err=True)
    typer.echo("(the full traceback: the same command with --debug)", err=True)
    raise typer.Exit(2) from None


def _print_result(cfg: JobConfig, result) -> None:
    if not result.rows:
        return
    last = result.rows[-1]

    def before_after(before: float, after: float | None) -> str:  # a stopped run has no final evaluation
        return (
            f"before {before:.3f}, after {after:.3f}"
            if after is not None
            else f"before {before:.3f} (stopped before the last)"
        )

    if result.accuracy_before is not None:
        typer.echo(
            f"held-out accuracy (greedy, verifier): {before_after(result.accuracy_before, result.accuracy_after)}"
        )
    if result.sampled_accuracy_before is not None:
        typer.echo(
            f"held-out accuracy ({cfg.data.eval_samples} samples per prompt, verifier): "
            f"{before_after(result.sampled_accuracy_before, result.sampled_accuracy_after)}"
        )
    if result.early_stop:
        typer.echo(f"stopped early: {result.early_stop}")
    typer.echo(
        f"done: {len(result.rows)} steps, weight version {result.final_version}, "
        f"final reward {last['reward_mean']:.3f}; metrics in {result.run_dir}/metrics.jsonl"
    )


def _base_model(cfg: JobConfig) -> str:
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

    cfg = _load(config, set_)
    if getattr(cfg, kind) is None:
        typer.echo(f"error: {config} has no `{kind}` section (see configs/three_stage.yaml)", err=True)
        raise typer.Exit(2) from None
    sft_out = cfg.stage_output("sft")
    base = str(sft_out) if start_from_sft and (sft_out / "config.json").is_file() else _base_model(cfg)
    _connect(address or cfg.cluster.address, cfg.cluster.num_cpus)
    try:
        summary = run_stage(cfg, kind, base, progress=cfg.train.progress)
    finally:
        ray.shutdown()
    typer.echo(_stage_line(summary))


@app.command()
def sft(
    config: Path = typer.Argument(..., help="YAML job config with an `sft` section."),
    address: str | None = typer.Option(None, help="Ray address; empty starts a local instance."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: section.field=value (repeatable)."),
) -> None:
    """Supervised fine-tuning of the config's model on prompt/response data (loss on response tokens only)."""
    _run_stage_command(config, set_, address, "sft", start_from_sft=False)


@app.command("train-rm")
def train_rm(
    config: Path = typer.Argument(..., help="YAML job config with a `reward_model` section."),
    address: str | None = typer.Option(None, help="Ray address; empty starts a local instance."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: section.field=value (repeatable)."),
) -> None:
    """Train a reward model (Bradley-Terry on preference pairs), starting from the SFT model if one was trained."""
    _run_stage_command(config, set_, address, "reward_model", start_from_sft=True)


@app.command()
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

    cfg = _load(config, set_)
    if cfg.sft is None or cfg.reward_model is None:
        typer.echo(f"error: {config} needs both an `sft` and a `reward_model` section", err=True)
        raise typer.Exit(2) from None
    _preflight(cfg)  # the RL stage's rules, before hours of SFT and reward-model training
    _connect(address or cfg.cluster.address, cfg.cluster.num_cpus)
    try:
        sft_summary = run_stage(cfg, "sft", _base_model(cfg), progress=cfg.train.progress)
        typer.echo(_stage_line(sft_summary))
        rm_summary = run_stage(cfg, "reward_model", sft_summary["output"], progress=cfg.train.progress)
        typer.echo(_stage_line(rm_summary))
        # RL starts from the SFT policy (also the reference) and is rewarded by the trained reward model.
        rl = cfg.model_copy(deep=True)
        rl.model.path, rl.model.sft_warmup_steps = sft_summary["output"], 0
        if not rl.scoring.reward_models:
            rl.scoring.reward_models = [RewardModelSpec(path=rm_summary["output"], name="rm")]
        result = run_job(rl)
    finally:
        ray.shutdown()
    _print_result(rl, result)
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


# ---- jobs on a cluster (Ray Jobs API) ---------------------------------------------------------
@app.command()
def submit(
    config: Path = typer.Argument(..., help="YAML job config."),
    address: str = typer.Option(..., help="Ray dashboard address, e.g. http://HEAD:8265."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: section.field=value (repeatable)."),
    python: str = typer.Option(
        "python", help="Python on the cluster's head node that has rlhf_cluster's dependencies."
    ),
    max_retries: int = typer.Option(
        0, "--max-retries", min=0, help="Resume the job (--resume auto) after its driver dies, up to this many times."
    ),
    py_modules: list[Path] = typer.Option(
        [],
        "--py-modules",
        help="A module file or package directory to ship with the job (repeatable); reward functions' own modules "
        "are shipped without it.",
    ),
    working_dir: Path | None = typer.Option(
        None,
        "--working-dir",
        help="A directory whose contents are shipped into the job's working directory (on the path of every actor).",
    ),
) -> None:
    """Submit a job through Ray's Jobs API (code, config and the user's modules shipped as the working dir);
    print its id."""
    cfg = _load(config, set_)
    # The files a config names are paths on the cluster, not here: only the config's own rules.
    for warning in _preflight(cfg, files=False):
        typer.echo(f"warning: {warning}", err=True)
    stage = stage_working_dir(cfg, py_modules, working_dir)
    try:
        job_id = job_client(address).submit_job(
            entrypoint=f"{python} -m actors.cli train job.yaml --address auto --max-retries {max_retries}",
            runtime_env={"working_dir": str(stage)},
            metadata={"rlhf_job_name": cfg.name},
        )
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    typer.echo(job_id)


@app.command()
def status(
    job: str = typer.Argument(..., help="Job id from `submit`, or a run directory."),
    address: str | None = typer.Option(None, help=ADDRESS_HELP + " Needed for a job id."),
) -> None:
    """Print a submitted job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED); for a run
    directory, the run's progress, held-out accuracy, checkpoints and guardrail actions."""
    if Path(job).is_dir():
        return run_views.run_status(Path(job))
    if address is None:
        typer.echo(f"error: {job!r} is no run directory; a submitted job's id needs --address", err=True)
        raise typer.Exit(2) from None
    typer.echo(str(job_client(address).get_job_status(job).value))


@app.command()
def logs(
    job: str = typer.Argument(..., help="Job id from `submit`."),
    address: str = typer.Option(..., help=ADDRESS_HELP),
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends."),
) -> None:
    """Print a submitted job's logs."""
    client = job_client(address)
    if not follow:
        typer.echo(client.get_job_logs(job), nl=False)
        return
    import asyncio

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job):
            typer.echo(chunk, nl=False)

    asyncio.run(stream())


@app.command()
def stop(
    job: str = typer.Argument(..., help="Job id from `submit`."), address: str = typer.Option(..., help=ADDRESS_HELP)
) -> None:
    """Stop a submitted job."""
    stopped = job_client(address).stop_job(job)
    typer.echo("stopping" if stopped else "not running")


@app.command()
def scale(
    job: str = typer.Argument(..., help="The job's name (config `name`) or its submission id."),
    pool: str = typer.Option(..., help="generation | reward | reference | scoring (both scoring pools)."),
    replicas: int = typer.Option(..., help="New number of workers."),
    address: str = typer.Option("auto", help="Ray address of the job's cluster (GCS, e.g. HEAD:6379)."),
    dashboard: str | None = typer.Option(None, help="Dashboard address, needed only when JOB is a submission id."),
) -> None:
    """Grow or shrink a pool of a running job; new workers load the newest weights first."""
    import ray

    from actors.workers.control import scale as scale_pool

    name = job
    if job.startswith("raysubmit_") or dashboard:
        info = job_client(dashboard or address).get_job_info(job)
        name = (info.metadata or {}).get("rlhf_job_name", job)
    ray.init(address=address, log_to_driver=False)
    try:
        outcomes = scale_pool(name, pool, replicas)
    finally:
        ray.shutdown()
    for pool_name, outcome in outcomes.items():
        typer.echo(
            f"{pool_name}: {outcome['sizes'][pool_name]} workers (changed: {', '.join(outcome['changed']) or 'none'})"
        )
    sizes = list(outcomes.values())[-1]["sizes"]
    typer.echo("layout: " + ", ".join(f"{name} {count}" for name, count in sizes.items()))


@app.command()
def gateway(
    config: Path = typer.Argument(DEFAULT_CONFIG, exists=True, dir_okay=False),
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
    from rlhf_cluster.config.generation import is_loopback
    from rlhf_cluster.gateway.standalone import serve

    cfg = _load(config, set_)
    if not is_loopback(host) and not token:
        typer.echo(f"error: --host {host} is reachable from other machines: set --token", err=True)
        raise typer.Exit(2) from None
    out = out or Path(cfg.run_dir) / "gateway" / "episodes.jsonl"
    serve(
        cfg,
        _base_model(cfg),
        host,
        port,
        token,
        out,
        on_ready=lambda url: typer.echo(
            f"gateway: {url}/v1 (episodes: {url}/episodes/<id>/v1); closed episodes -> {out}"
        ),
    )


for view in (run_views.plot, run_views.samples, run_views.trace, run_views.replay):
    app.command()(view)


@app.command()
def version() -> None:
    """Print the package version."""
    from importlib.metadata import version as v

    typer.echo(v("rlhf-cluster"))


if __name__ == "__main__":
    app()
