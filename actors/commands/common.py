"""What several `rlhf-cluster` commands share: the repository's paths and default config, loading a
config, running preflight and checking the run directory (a refusal ends the command with exit
code 2, `refused_input`), connecting to Ray and reading the cluster's capacity, turning an input
error into its one-line message, and printing a finished job's result."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import typer

from rlhf_cluster.config import ConfigError, FunctionReward, JobConfig, load_config
from rlhf_cluster.job.preflight import preflight

SET_HELP = "Override a field: section.field=value, a list's item by index (scoring.rewards.0.weight=2); repeatable."

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "configs" / "demo.yaml"


def refuse(*problems: str, hint: str | None = None) -> NoReturn:
    """End the command on refused input: one `error: ...` line per problem (and the hint), exit code 2."""
    for problem in problems:
        typer.echo(f"error: {problem}", err=True)
    if hint is not None:
        typer.echo(hint, err=True)
    raise typer.Exit(2)


@contextmanager
def refused_input(*errors: type[BaseException]) -> Iterator[None]:
    """One of `errors` (input refused: a config, a file of the run) ends the command with its
    one-line message and exit code 2, not a traceback (`refuse`)."""
    try:
        yield
    except errors as exc:
        refuse(str(exc))


def load_config_or_exit(config: Path, overrides: list[str]) -> JobConfig:
    """The config at `config` with `overrides`; an invalid one ends the command with its message (exit code 2)."""
    with refused_input(ConfigError):
        return load_config(config, overrides)


PROBE_TIMEOUT_S = 3.0
_DEFAULT_PORTS = {"http": 80, "https": 443, "ray": 10001}


def host_port(address: str) -> tuple[str, int] | None:
    """The host and port `address` names (HOST:PORT, http(s)://HOST[:PORT], ray://HOST[:PORT]);
    None for one that names no port ('auto', 'local', a bare host name: left to Ray)."""
    parts = urlsplit(address if "://" in address else "//" + address)
    try:
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:  # a port that is no number: Ray says what is wrong with it
        return None
    return (parts.hostname, port) if parts.hostname and port else None


def unreachable(address: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why nothing takes a TCP connection at `address`'s host and port within `timeout` seconds
    ('connection refused', 'no answer in 3 s', 'unknown host ...'); None when something does, or
    when `address` names no port to try (`host_port`)."""
    target = host_port(address)
    if target is None:
        return None
    try:
        with socket.create_connection(target, timeout=timeout):
            return None
    except ConnectionRefusedError:
        return "connection refused"
    except TimeoutError:
        return f"no answer in {timeout:g} s"
    except socket.gaierror:
        return f"unknown host {target[0]}"
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()


def not_ray(address: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why what answers at a GCS (HOST:PORT) or Ray Client (ray://) address is not Ray: both
    speak gRPC, and a port that takes TCP but opens no gRPC channel within `timeout` seconds (a
    web server, another service) would have `ray.init` retry it for minutes. None when the channel
    opens, for an address of another kind, or with TLS (RAY_USE_TLS: its certificates are Ray's)."""
    import grpc

    target = host_port(address)
    scheme = urlsplit(address).scheme if "://" in address else ""
    if target is None or scheme not in ("", "ray") or os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return None
    host, port = target
    target_name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    # Straight to the port, as Ray's own GCS client goes (an http_proxy set for the web is not for it).
    with grpc.insecure_channel(target_name, options=[("grpc.enable_http_proxy", 0)]) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            return f"something answers there, but no gRPC server within {timeout:g} s (is that Ray's port?)"
    return None


def connect(address: str | None, num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """`ray.init` on the cluster at `address`, or on a new local instance when it is empty. A
    cluster that cannot be reached ends the command in one line (exit code 2): a HOST:PORT that
    takes no TCP connection within seconds, or opens no gRPC channel (`not_ray`), is refused before
    `ray.init`, which would retry it for minutes; what Ray itself cannot connect to ('auto' with no
    cluster) is refused after it."""
    import ray

    if not address:
        # "local" always starts a new instance, never attaching to another cluster on the machine.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver)
        return
    if (why := unreachable(address)) is not None:
        refuse(f"cannot reach Ray at {address}: {why}; is the cluster up? (--address)")
    if (why := not_ray(address)) is not None:
        refuse(f"cannot reach Ray at {address}: {why} (--address)")
    try:
        ray.init(address=address, log_to_driver=log_to_driver)
    except ConnectionError as exc:
        refuse(f"cannot reach Ray at {address}: {first_sentence(str(exc))} (--address)")


def refuse_a_taken_port(host: str, port: int, option: str) -> None:
    """End the command now when `host:port` cannot be listened on (another server holds it), before
    minutes of start-up end in a bind error's traceback (trial 23b: the gateway after its engine,
    `tinker` after Ray and the learner). Port 0 (any free one) always can."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds (a closed one's TIME_WAIT)
        try:
            sock.bind((host, port))
        except OSError as exc:
            refuse(f"{host}:{port}: cannot listen there ({exc.strerror}); another server holds it? {option}")


def first_sentence(message: str) -> str:
    """`message` up to its first full stop (or its first line): Ray's errors run on with advice."""
    line = message.strip().splitlines()[0] if message.strip() else message
    return line.split(". ")[0].rstrip(".")


def cluster_capacity(address: str | None, cfg: JobConfig) -> list[dict[str, float]]:
    """The resources of every live node (this machine for a local instance); an unreachable
    cluster ends the command in one line (`connect`)."""
    if address is None:
        import torch

        return [{"CPU": float(cfg.cluster.num_cpus or os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]
    import ray

    connect(address)
    try:
        return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    finally:
        ray.shutdown()


def preflight_or_exit(cfg: JobConfig, files: bool = True, resume: str | None = None) -> list[str]:
    """`preflight`'s warnings; its refusal ends the command with the message (exit code 2)."""
    with refused_input(ConfigError):
        return preflight(cfg, files=files, resume=resume)


def run_dir_refusal(cfg: JobConfig, resume: str | None, overwrite: str | None) -> str | None:
    """Why the job may not start in its run directory now (another live job holds it, or a fresh
    start without --overwrite would clear an earlier run), found before Ray starts; None when it
    may. The driver takes the directory's lock and checks again (`RunDir.prepare`)."""
    from rlhf_cluster.run.run_dir import RunDir

    return RunDir(cfg.run_dir, cfg.weights_dir, cfg.checkpoint_dir).refusal(fresh=resume is None, overwrite=overwrite)


def debug_option():
    """`--debug`: an error caused by input keeps its traceback (`exit_on_input_error`)."""
    return typer.Option(
        False,
        "--debug",
        help="Show the full traceback of an error caused by input (config, files, reward code, checkpoints).",
    )


def exit_on_input_error(exc: BaseException, debug: bool) -> None:
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
    refuse(str(cause), hint="(the full traceback: the same command with --debug)")


def print_result(cfg: JobConfig, result) -> None:
    """What an RL job ends with: held-out accuracy before and after (its reward where the reward does
    not say which answers are right), an early stop, the last step's reward."""
    if not result.rows:
        return
    last = result.rows[-1]

    def before_after(before: float, after: float | None) -> str:  # a stopped run has no final evaluation
        if after is not None:
            return f"before {before:.3f}, after {after:.3f}"
        return f"before {before:.3f}" + (" (stopped before the last)" if result.stopped else ", after n/a")

    samples = f"{cfg.data.eval_samples} samples per prompt"
    if result.accuracy_before is not None:
        rule = cfg.scoring.rule_source
        judged = rule.function if isinstance(rule, FunctionReward) else "verifier"  # who says an answer is right
        figures = [
            ("accuracy", f"greedy, {judged}", result.accuracy_before, result.accuracy_after),
            ("accuracy", f"{samples}, {judged}", result.sampled_accuracy_before, result.sampled_accuracy_after),
        ]
    else:  # the reward does not say which answers are right: its mean
        figures = [
            ("reward", "greedy", result.reward_before, result.reward_after),
            ("reward", samples, result.sampled_reward_before, result.sampled_reward_after),
        ]
    for what, how, before, after in figures:
        if before is not None:
            typer.echo(f"held-out {what} ({how}): {before_after(before, after)}")
    if result.early_stop:
        typer.echo(f"stopped early: {result.early_stop}")
    typer.echo(
        f"done: {len(result.rows)} steps, weight version {result.final_version}, "
        f"final reward {last['reward_mean']:.3f}; metrics in {result.run_dir}/metrics.jsonl"
    )
