"""Job submission to a real Ray head started by the test (and only its processes stopped)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from rlhf_cluster.fileio import read_jsonl

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
CLI = str(VENV_BIN / "rlhf-cluster")


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def ray_head():
    """`ray start --head --block` on 127.0.0.1 with its own ports and temp dir; SIGTERM ends it."""
    gcs, dash, client, agent, agent_grpc, metrics, runtime_env = _free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="rlhf-head-", dir="/tmp")
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}", "--num-cpus=4", f"--temp-dir={temp_dir}",
    ]
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:
            break  # the dashboard answers (401 when token auth is on): it is up
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                head.kill()
                raise RuntimeError(f"ray head did not come up: {head.stdout.read().decode()[-3000:]}")
            time.sleep(1)
    yield address, env, f"127.0.0.1:{gcs}"
    # --block makes `ray start` own the head's processes: SIGTERM to it stops them all. Its
    # session (start_new_session) is killed as a backstop, nothing else on the machine.
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    shutil.rmtree(temp_dir, ignore_errors=True)


def _cli(env, *args, timeout=120, cwd=REPO) -> str:
    out = subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.strip()


# Each CLI call is a new Python process (~2.3 s of CPU): polled every 2 s, they took a core from the
# jobs they were watching on a 2-core machine. Polls are spaced, and progress is read from files.
POLL_S = 6


def _wait_status(env, address, job, wanted, timeout=300, poll_s=POLL_S) -> str:
    deadline = time.monotonic() + timeout
    while True:
        state = _cli(env, "status", job, "--address", address)
        if state in wanted or time.monotonic() > deadline:
            return state
        time.sleep(poll_s)


def _rows(run_dir: Path) -> list[dict]:
    """The steps logged so far (a line still being appended is left out)."""
    return read_jsonl(run_dir / "metrics.jsonl").rows


TRL_REWARD = """
def score(completions, prompts, completion_ids, **kwargs):
    rows = {len(completions), len(prompts), len(completion_ids), len(kwargs["answer"])}
    if len(rows) != 1:
        raise TypeError(f"not TRL's batch: {rows} rows")
    for prompt, completion in zip(prompts, completions):  # TRL's conversational form, as its docs read it
        question, text = prompt[-1]["content"], completion[0]["content"]
        if not question.endswith("=") or not isinstance(text, str):
            raise TypeError(f"not TRL's conversational form: {prompt!r}, {completion!r}")
    return [0.375] * len(completions)
"""


def test_submit_follow_scale_and_stop(ray_head, model_cache, tmp_path):
    """One submitted job, followed, resized and stopped from the CLI. (A submitted job that ends by
    itself is SUCCEEDED: Ray's status for an entrypoint that exits 0, which the `train` command
    does at the end of every run the other job tests drive through it.)"""
    address, env, gcs = ray_head
    run_dir = tmp_path / "run"
    # The demo at the test's sizes: one learner rank, no warm-up, no held-out evaluation, and no
    # reference model (the demo's KL coefficient is 0), so the job starts three worker processes, not four.
    # Its reward module lives in the user's own directory, outside the project: submitted from
    # there, it is shipped with the job and scores every response on the cluster. It is a TRL reward
    # function (`reward_funcs`), run as TRL calls it (`batch: true`): once per batch, by keyword, its
    # lists aligned, and over a chat dataset (a messages column, rendered by the built-in model's
    # stand-in chat template) in TRL's conversational form; on anything else it raises, and
    # `on_error: fail` ends the job with the cause.
    user_dir = tmp_path / "user"
    user_dir.mkdir()
    (user_dir / "user_reward.py").write_text(TRL_REWARD)
    chats = [{"prompt": [{"role": "user", "content": f"{a}+{b}="}], "answer": str(a + b)}
             for a in range(8) for b in range(8)]
    (user_dir / "chats.jsonl").write_text("".join(json.dumps(row) + "\n" for row in chats))
    rewards = "[{type: function, function: 'user_reward:score', batch: true, on_error: fail}]"
    job = _cli(env, "submit", str(REPO / "configs" / "demo.yaml"), "--set", "train.total_steps=100000",
               "--set", f"run_dir={run_dir}", "--set", f"scoring.rewards={rewards}",
               "--set", f"data.path={user_dir / 'chats.jsonl'}", "--set", "data.columns={messages: prompt}",
               "--set", "data.chat_template=true",
               "--set", f"model.cache_dir={model_cache}", "--set", "train.progress=false", "--set", "learner.world_size=1",
               "--set", "model.sft_warmup_steps=0", "--set", "data.eval_prompts=0",
               "--set", "scoring.reference=false", "--python", sys.executable, "--address", address,
               cwd=user_dir).splitlines()[-1]

    # Progress is read from the run's files; the CLI (a new process each call) is asked now and then.
    deadline, checked = time.monotonic() + 300, 0.0
    while len(_rows(run_dir)) < 2:  # its pools serve
        if time.monotonic() - checked > POLL_S:
            assert _cli(env, "status", job, "--address", address) in ("PENDING", "RUNNING"), \
                _cli(env, "logs", job, "--address", address)[-3000:]
            checked = time.monotonic()
        assert time.monotonic() < deadline, "the job did not train"
        time.sleep(0.5)
    rows = _rows(run_dir)
    assert [r["weight_version"] for r in rows[:2]] == [1, 2]
    assert all(r["reward_mean"] == 0.375 for r in rows), [r["reward_mean"] for r in rows]  # the user's function scored
    # ...and the job's log, as the CLI shows it, has the steps (the log reaches the head a moment later).
    logs_deadline = time.monotonic() + 60
    while "step    1 |" not in (logs := _cli(env, "logs", job, "--address", address)):
        assert time.monotonic() < logs_deadline, logs[-3000:]
        time.sleep(POLL_S)
    # A pool of the job is resized from the CLI while it trains. (The CLI reaches every pool the same
    # way, through the job's control actor; a generation pool grown and shrunk while training, its
    # new engines fed by the weight transport: test_scaling.py.)
    out = _cli(env, "scale", job, "--pool", "reward", "--replicas", "2", "--address", gcs, "--dashboard", address,
               timeout=300)
    assert out.splitlines()[0].startswith("reward: 2 workers (changed: "), out
    assert "reward 2" in out.splitlines()[-1] and "generation 1" in out.splitlines()[-1], out  # the new layout
    trained = len(_rows(run_dir))
    assert _cli(env, "stop", job, "--address", address) == "stopping"
    assert _wait_status(env, address, job, {"STOPPED", "FAILED", "SUCCEEDED"}, timeout=120, poll_s=2) == "STOPPED"
    assert trained >= 2 and len(_rows(run_dir)) >= trained
    # The stop says how to continue: the user's own submit command, resumed (trial 23b C1: it named the
    # job's copy of the config, `train job.yaml`, a file the user does not have).
    logs_deadline = time.monotonic() + 60
    while "continue with:" not in (logs := _cli(env, "logs", job, "--address", address)):
        assert time.monotonic() < logs_deadline, logs[-3000:]
        time.sleep(POLL_S)
    resume = logs.split("continue with: ", 1)[1].splitlines()[0]
    assert resume.startswith("rlhf-cluster submit ") and "demo.yaml --address " in resume, resume
    assert resume.endswith("--resume auto") and f"run_dir={run_dir}" in resume, resume
