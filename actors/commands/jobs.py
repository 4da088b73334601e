"""Jobs on a cluster, through Ray's Jobs API: `rlhf-cluster submit`, `status`, `logs`, `stop` and
`scale` (a running job's pools), and `job_client`, the API's client. What `submit` ships is staged
by `submission.py`; these commands are registered by `actors/commands/cli.py`."""

from __future__ import annotations

import difflib
import shlex
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import typer

from actors.commands import run_views
from actors.commands.common import (
    SET_HELP,
    connect,
    first_sentence,
    load_config_or_exit,
    preflight_or_exit,
    refuse,
    unreachable,
)
from actors.commands.submission import stage_working_dir

RESUME_HINT = "RLHF_CLUSTER_RESUME_COMMAND"  # set in a submitted job: how its user continues it
DASHBOARD_HELP = "Ray dashboard address (the job API), e.g. http://HEAD:8265."


def job_client(address: str):
    """A Ray Jobs API client for the dashboard at `address` (http://HEAD:8265). A dashboard that
    cannot be reached ends the command in one line (exit code 2): its host and port are tried
    first, with a timeout of seconds (the client's own requests have none)."""
    from ray.job_submission import JobSubmissionClient

    def unreachable_api(why: str) -> NoReturn:
        refuse(f"cannot reach Ray's job API at {address} ({why}): is the cluster up? (--address)")

    if (why := unreachable(address)) is not None:
        unreachable_api(why)
    try:
        return JobSubmissionClient(address)
    except ConnectionError as exc:  # what the probe let through ('auto' with no cluster, a failed request)
        message = first_sentence(str(exc))
        unreachable_api("its requests failed" if message.startswith("Failed to connect to Ray") else message)


def submit(
    config: Path = typer.Argument(..., help="YAML job config."),
    address: str = typer.Option(..., help="Ray dashboard address, e.g. http://HEAD:8265."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
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
    resume: str | None = typer.Option(
        None, "--resume", help="Continue the run in the config's run_dir: `auto` (its newest checkpoint) or a path."
    ),
    overwrite: str | None = typer.Option(
        None,
        "--overwrite",
        metavar="[=delete]",
        help="Start over where an earlier run is: moved aside to RUN_DIR.old-<time>; --overwrite=delete deletes it.",
    ),
) -> None:
    """Submit a job through Ray's Jobs API (code, config and the user's modules shipped as the working dir);
    print its id."""
    if overwrite not in (None, "aside", "delete"):
        refuse(f"--overwrite={overwrite}: expected --overwrite (moves the earlier run aside) or --overwrite=delete")
    cfg = load_config_or_exit(config, set_)
    # The files a config names are paths on the cluster, not here: only the config's own rules.
    for warning in preflight_or_exit(cfg, files=False):
        typer.echo(f"warning: {warning}", err=True)
    relative = [f"{field}={value}" for field, value in _run_paths(cfg) if not Path(value).expanduser().is_absolute()]
    if relative:  # trial 23b C6: the run landed in Ray's per-job package folder, which Ray removes
        refuse(
            f"{', '.join(relative)}: relative, so on the cluster it would be inside the job's temporary working "
            "directory, which Ray deletes; give a path every node shares, e.g. --set run_dir=/shared/runs/NAME"
        )
    client = job_client(address)  # an unreachable cluster is refused before anything is staged
    stage = stage_working_dir(cfg, py_modules, working_dir)
    try:
        given = [*(["--resume", resume] if resume else []), *([f"--overwrite={overwrite}"] if overwrite else [])]
        # The stop's "continue with" line names this command, not the job's own copy of the config.
        again = [*(w for s in set_ for w in ("--set", s)), *(["--python", python] if python != "python" else [])]
        hint = shlex.join(["rlhf-cluster", "submit", str(config), "--address", address, *again, "--resume", "auto"])
        train = [python, "-m", "actors.commands.cli", "train", "job.yaml", "--address", "auto"]
        # Trial 23b C5: an interpreter without the project's dependencies failed with a bare
        # ModuleNotFoundError in the log and FAILED in status; it is named, with the option to fix it.
        lacks = f"error: {python} on the cluster lacks rlhf_cluster's dependencies; pass submit --python PATH"
        job_id = client.submit_job(
            entrypoint=f"{shlex.join([python, '-c', 'import typer, pydantic, yaml'])} || "
            f"{{ echo {shlex.quote(lacks)} >&2; exit 2; }}; "
            + shlex.join([*train, "--max-retries", str(max_retries), *given]),
            runtime_env={"working_dir": str(stage), "env_vars": {RESUME_HINT: hint}},
            metadata={"rlhf_job_name": cfg.name},
        )
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    typer.echo(job_id)


def _run_paths(cfg) -> list[tuple[str, str]]:
    """The config's folders a submitted job writes: the run directory, and the weight store and
    checkpoints where they are set apart from it."""
    given = [("run_dir", cfg.run_dir), ("weights.dir", cfg.weights.dir), ("checkpoint.dir", cfg.checkpoint.dir)]
    return [(field, str(value)) for field, value in given if value is not None]


def status(
    job: str = typer.Argument(..., help="Job id from `submit`, or a run directory."),
    address: str | None = typer.Option(None, help=DASHBOARD_HELP + " Needed for a job id, not a run directory."),
) -> None:
    """Print a submitted job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED); for a run
    directory, the run's progress, held-out accuracy, checkpoints and guardrail actions."""
    if Path(job).is_dir():
        return run_views.run_status(Path(job))
    if address is None:
        refuse(f"{job!r} is not a run directory (a submitted job's id needs --address)")
    with known_job(job, address):
        info = job_client(address).get_job_info(job)
    said = str(info.status.value)
    typer.echo(f"{said}: {info.message}" if said == "FAILED" and info.message else said)


def logs(
    job: str = typer.Argument(..., help="Job id from `submit`."),
    address: str = typer.Option(..., help=DASHBOARD_HELP),
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends."),
) -> None:
    """Print a submitted job's logs."""
    client = job_client(address)
    if not follow:
        with known_job(job, address):
            typer.echo(client.get_job_logs(job), nl=False)
        return
    import asyncio

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job):
            typer.echo(chunk, nl=False)

    asyncio.run(stream())


def stop(
    job: str = typer.Argument(..., help="Job id from `submit`."), address: str = typer.Option(..., help=DASHBOARD_HELP)
) -> None:
    """Stop a submitted job."""
    with known_job(job, address):
        stopped = job_client(address).stop_job(job)
    typer.echo("stopping" if stopped else "not running")


@contextmanager
def known_job(job: str, address: str) -> Iterator[None]:
    """Ray's job API's 404 for an id it does not know as one line naming the id, not a traceback."""
    try:
        yield
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            refuse(f"no job {job!r} at {address} (the ids `submit` printed; `ray job list --address {address}`)")
        raise


def scale(
    job: str = typer.Argument(..., help="The job's name (config `name`) or its submission id."),
    pool: str = typer.Option(
        ...,
        help="generation | reward | reference | teacher (distillation's) | judge | scoring (the reward pool and "
        "the reference or teacher pool).",
    ),
    replicas: int | None = typer.Option(
        None, min=1, help="New number of workers; pins the pool's size (the autoscaler leaves it alone until --auto)."
    ),
    auto: bool = typer.Option(
        False, "--auto", help="Hand the pool back to the autoscaler (scaling.auto) without resizing it."
    ),
    address: str = typer.Option("auto", help="Ray address of the job's cluster (GCS, e.g. HEAD:6379)."),
    dashboard: str | None = typer.Option(None, help="Dashboard address, needed only when JOB is a submission id."),
) -> None:
    """Grow or shrink a pool of a running job (new workers load the newest weights first) and pin
    its size; or with --auto release the pin."""
    check_scale_flags(replicas, auto)
    from actors.workers.control import POOLS
    from actors.workers.control import scale as scale_pool

    check_pool(pool, (*POOLS, "scoring"))
    name = job
    if job.startswith("raysubmit_") or dashboard:
        info = job_client(dashboard or address).get_job_info(job)
        name = (info.metadata or {}).get("rlhf_job_name", job)
    import ray

    if address.startswith(("http://", "https://")):
        refuse(
            f"--address {address}: scale joins the cluster as a driver: give its GCS address (HEAD:6379); the "
            "dashboard URL is for submit, status, logs and stop (scale's --dashboard, for a submission id)"
        )
    connect(address, log_to_driver=False)
    try:
        outcomes = scale_pool(name, pool, replicas)
    except ValueError as exc:  # no controller actor of that name: no such job runs there
        if "look up actor" not in str(exc):
            raise
        refuse(f"no running job named {name!r} on the cluster at {address} (a job's name is its config's `name`)")
    except RuntimeError as exc:  # the job refused the resize (a pool it does not run), with its reason
        refuse(str(exc))
    finally:
        ray.shutdown()
    for pool_name, outcome in outcomes.items():
        typer.echo(
            f"{pool_name}: {outcome['sizes'][pool_name]} workers (changed: {', '.join(outcome['changed']) or 'none'}; "
            f"{_sizing(pool_name, outcome, replicas)})"
        )
    sizes = list(outcomes.values())[-1]["sizes"]
    typer.echo("layout: " + ", ".join(f"{name} {count}" for name, count in sizes.items()))


def _sizing(pool: str, outcome: dict, replicas: int | None) -> str:
    """Who sizes `pool` now, in `status`'s words: the autoscaler (auto), the operator's pin of an
    auto pool (pinned), or nobody but `scale` (fixed: the job has no `scaling.auto.<pool>`)."""
    if pool in outcome.get("auto", ()):
        return "auto"
    if pool not in outcome.get("managed", ()):
        return "fixed" if replicas is not None else f"fixed: the job has no scaling.auto.{pool} to hand it back to"
    return "pinned (--auto releases it)"


def check_scale_flags(replicas: int | None, auto: bool) -> None:
    """`scale` takes a size (which pins the pool) or --auto (which releases it), exactly one."""
    if replicas is not None and auto:
        refuse(
            "--replicas and --auto together: --replicas pins the pool's size, --auto hands it back to the "
            "autoscaler; give one"
        )
    if replicas is None and not auto:
        refuse("give --replicas N (resize and pin the pool) or --auto (hand it back to the autoscaler)")


def check_pool(pool: str, pools: tuple[str, ...]) -> None:
    """`scale --pool` names one of `pools`; another is refused with the nearest as a suggestion."""
    if pool in pools:
        return
    near = difflib.get_close_matches(pool, pools, n=1)
    suggestion = f" (did you mean {near[0]}?)" if near else ""
    refuse(f"--pool {pool}: no such pool{suggestion}; expected one of {', '.join(pools)}")
