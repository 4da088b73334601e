"""A cluster that cannot be reached ends a command in one line with exit code 2, within seconds,
never a traceback or minutes of Ray retrying: the job API's commands (`submit`, `status`, `logs`,
`stop`), `train` (dry run and real) and `scale`. The CLI runs as a real subprocess under
`timeout`, against a port with nothing listening."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from actors.commands import common, jobs
from actors.commands.cli import app
from actors.commands.common import host_port, not_ray, unreachable

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "demo.yaml")
CLI = [sys.executable, "-m", "actors.commands.cli"]


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, limit_s: int = 60) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run(
        ["timeout", "-s", "KILL", str(limit_s), *CLI, *args], cwd=REPO, capture_output=True, text=True
    )
    return done, time.monotonic() - start


def assert_one_error_line(done: subprocess.CompletedProcess, message: str) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:6379", ("127.0.0.1", 6379)),
        ("head.example:6379", ("head.example", 6379)),
        ("http://head:8265", ("head", 8265)),
        ("http://head", ("head", 80)),
        ("https://head", ("head", 443)),
        ("ray://head", ("head", 10001)),
        ("ray://head:10002", ("head", 10002)),
        ("[::1]:6379", ("::1", 6379)),
        ("auto", None),
        ("local", None),
        ("head", None),
        ("head:port", None),
    ],
)
def test_host_port_parses_what_it_can_and_leaves_the_rest_to_ray(address, expected):
    assert host_port(address) == expected


def test_unreachable_says_why_with_real_sockets(closed_port):
    assert unreachable(f"127.0.0.1:{closed_port}") == "connection refused"
    assert unreachable(f"http://127.0.0.1:{closed_port}") == "connection refused"
    assert unreachable("auto") is None  # nothing to probe: Ray finds the cluster
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        assert unreachable(f"127.0.0.1:{listening.getsockname()[1]}") is None


@pytest.fixture
def web_server():
    """A web server on 127.0.0.1 (HTTP/1.1, no gRPC): a port that answers but is not Ray's."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_a_port_that_answers_without_grpc_is_not_ray(web_server):
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    started = time.monotonic()
    assert "no gRPC server within 1 s" in not_ray(f"127.0.0.1:{web_server}", timeout=1.0)
    assert "no gRPC server" in not_ray(f"ray://127.0.0.1:{web_server}", timeout=1.0)
    assert time.monotonic() - started < 10
    assert not_ray(f"http://127.0.0.1:{web_server}") is None  # the job API is HTTP: not this probe's
    server = grpc.server(ThreadPoolExecutor(1))  # what a GCS or a Ray Client server is, to a channel
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert not_ray(f"127.0.0.1:{port}") is None
    finally:
        server.stop(None)


def test_train_refuses_an_address_that_is_not_ray_in_one_line(web_server):
    """Found by a new-user trial: a web server's port had `ray.init` retry for minutes."""
    done, seconds = run_cli("train", DEMO, "--dry-run", "--address", f"127.0.0.1:{web_server}")
    assert_one_error_line(done, f"cannot reach Ray at 127.0.0.1:{web_server}: something answers there, but no gRPC")
    assert seconds < 45


@pytest.mark.parametrize(
    "args",
    [["logs", "abc"], ["stop", "abc"], ["status", "abc"], ["submit", DEMO, "--set", "run_dir=/shared/runs/demo"]],
    ids=["logs", "stop", "status", "submit"],
)
def test_job_api_commands_refuse_an_unreachable_dashboard_in_one_line(args, closed_port):
    address = f"http://127.0.0.1:{closed_port}"
    done, _ = run_cli(*args, "--address", address)
    assert_one_error_line(
        done, f"cannot reach Ray's job API at {address} (connection refused): is the cluster up? (--address)"
    )


def test_a_failed_job_api_request_is_one_line(monkeypatch, capsys):
    """What the probe lets through (a port that answers, then a failed request) is one line too.
    (A fake client: the failure of a live dashboard is not cheap to stage.)"""
    import ray.job_submission

    def failing(address):
        raise ConnectionError(f"Failed to connect to Ray at address: {address}.")

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", failing)
    with pytest.raises(typer.Exit) as exit_:
        jobs.job_client("auto")
    assert exit_.value.exit_code == 2
    assert capsys.readouterr().err.strip() == (
        "error: cannot reach Ray's job API at auto (its requests failed): is the cluster up? (--address)"
    )


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "real"])
def test_train_refuses_an_unreachable_gcs_within_seconds(dry_run, closed_port, tmp_path):
    address = f"127.0.0.1:{closed_port}"
    flags = ["--dry-run"] if dry_run else ["--set", f"run_dir={tmp_path / 'run'}"]
    done, took = run_cli("train", DEMO, "--address", address, *flags)
    assert_one_error_line(done, f"cannot reach Ray at {address}: connection refused; is the cluster up?")
    assert took < 30, took  # before the fix: minutes of Ray retrying the GCS
    assert not (tmp_path / "run").exists()


def test_scale_checks_the_pool_name_before_the_cluster():
    result = CliRunner().invoke(app, ["scale", "demo", "--pool", "generaton", "--replicas", "2"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "--pool generaton: no such pool (did you mean generation?)" in lines[0]
    assert "generation, reward, reference, teacher, judge, scoring" in lines[0]


def test_scale_refuses_an_unreachable_cluster_in_one_line(closed_port):
    address = f"127.0.0.1:{closed_port}"
    done, _ = run_cli("scale", "demo", "--pool", "generation", "--replicas", "2", "--address", address)
    assert_one_error_line(done, f"cannot reach Ray at {address}: connection refused; is the cluster up?")


def test_what_ray_itself_cannot_connect_to_is_one_line(monkeypatch, capsys):
    """'auto' has no port to probe: Ray's own ConnectionError (no running instance) is refused in
    one line. (A fake ray.init: whether a cluster runs on this machine is not the test's to choose.)"""
    import ray

    def no_instance(**_):
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to.")

    monkeypatch.setattr(ray, "init", no_instance)
    with pytest.raises(typer.Exit) as exit_:
        common.connect("auto")
    assert exit_.value.exit_code == 2
    assert capsys.readouterr().err.strip() == (
        "error: cannot reach Ray at auto: Could not find any running Ray instance (--address)"
    )


def test_status_help_names_the_dashboard_not_train_or_scale():
    result = CliRunner().invoke(app, ["status", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "train/scale" not in result.output and "http://HEAD:8265" in result.output
    assert jobs.DASHBOARD_HELP in " ".join(result.output.replace("│", " ").split())
