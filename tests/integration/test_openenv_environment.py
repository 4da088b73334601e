"""A public environment format through the adapter (issue 57): an environment written for OpenEnv
(openenv-core's `Environment`, served by its own `create_fastapi_app` in a real subprocess) is
the agent of a job (`generation.agent.environment: {type: openenv}`). Every trained sample is one
episode of the environment: its model turns are the answers the environment received, one per
step, its reward is the sum of the environment's step rewards, and every sample of a group met
the same task (the reset seed comes from the prompt)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest

from actors.job import run_job
from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.run.scored_log import ScoredLog

HERE = Path(__file__).resolve().parent


@pytest.fixture
def arith_env(tmp_path):
    """The OpenEnv server on a free port; yields (url, its step log)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "env-steps.jsonl"
    server = subprocess.Popen([sys.executable, str(HERE / "openenv_arith_env.py"), str(port)],
                              env={**os.environ, "OPENENV_ARITH_LOG": str(log)}, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the OpenEnv server did not start") from None
            time.sleep(0.3)
    yield url, log
    server.terminate()
    server.wait(30)


def test_an_openenv_environment_is_the_agent_and_its_rewards_train(ray_cluster, job_config, arith_env):
    url, log = arith_env
    cfg = job_config(name="openenv", generation={
        "agent": {"environment": {"type": "openenv", "url": url, "action_field": "answer",
                                  "observation_field": "question", "max_turns": 4, "max_tokens": 4},
                  "timeout_s": 120},
        "sampling": {"n": 4, "max_new_tokens": 48}, "turn_rewards": {"combine": "sum"}},
        train={"total_steps": 2, "prompts_per_step": 2, "max_staleness": 1, "progress": False,
               "record_rollouts": True})
    result = run_job(cfg)
    assert [r["step"] for r in result.rows] == [0, 1]

    steps: dict[str, list[dict]] = defaultdict(list)
    for row in map(json.loads, log.read_text().splitlines()):
        steps[row["episode_id"]].append(row)
    scored = [s for _, group in ScoredLog(Path(cfg.run_dir) / RunDir.SCORED_LOG).since(0) for s in group]
    assert len(scored) >= 2 * 2 * 4
    seeds = defaultdict(set)
    for s in scored:
        [episode] = [rows for eid, rows in steps.items() if eid.startswith(s.sample_id + ":")]
        assert [r["turn"] for r in episode] == [0, 1], "the environment's two steps, in order, then done"
        # The model's turns are the actions; its reward, the environment's.
        turns = sum(1 for t, m in enumerate(s.loss_mask) if m and (t == 0 or not s.loss_mask[t - 1]))
        assert turns == len(episode)
        assert s.reward_components["turn_reward"] == sum(r["reward"] for r in episode)
        seeds[s.group_id].add(episode[0]["seed"])
    assert all(len(group_seeds) == 1 for group_seeds in seeds.values()), "a group's samples met different tasks"
    assert len({next(iter(v)) for v in seeds.values()}) > 1, "every prompt met the same task"
    assert any(s.reward_components["turn_reward"] > 0 for s in scored)


class _Replies:
    """Stands in for the gateway's `openai` client: every reply is `text` (the job test above runs the real one)."""

    def __init__(self, text):
        self.text, self.sent = text, []
        self.chat = self
        self.completions = self

    def __call__(self, **kwargs):
        return self

    def create(self, model, messages, **kwargs):
        self.sent.append([dict(m) for m in messages])
        message = type("M", (), {"content": self.text})
        return type("R", (), {"choices": [type("C", (), {"message": message})]})


def test_the_adapter_speaks_openenvs_protocol_and_names_a_refusal(arith_env, monkeypatch):
    from rlhf_cluster.config import OpenEnvEnvironment
    from rlhf_cluster.gateway import openenv

    url, log = arith_env
    replies = _Replies("7")
    monkeypatch.setattr(openenv, "OpenAI", replies)
    env = OpenEnvEnvironment(url=url, action_field="answer", observation_field="question")
    prompt = [{"role": "user", "content": "Answer each sum."}]
    reward = openenv.OpenEnvAgent(env, "policy")("http://gw/episodes/s1:abcd/v1", "key", [dict(m) for m in prompt])
    assert reward == 2.0  # two steps, a digit in each reply
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(r["episode_id"], r["turn"], r["answer"]) for r in rows] == [("s1:abcd", 0, "7"), ("s1:abcd", 1, "7")]
    assert {r["seed"] for r in rows} == {openenv.seed_of(prompt)}
    # The model saw the prompt, then each question as the user's turn, after its own earlier reply.
    assert [m["content"] for m in replies.sent[1]] == ["Answer each sum.", rows[0]["question"], "7", rows[1]["question"]]

    wrong = OpenEnvEnvironment(url=url, action_field="reply", observation_field="question")
    with pytest.raises(openenv.EnvironmentProtocolError, match=f"environment at {url} refused step: .*VALIDATION_ERROR"):
        openenv.OpenEnvAgent(wrong, "policy")("http://gw/episodes/s2:abcd/v1", "key", [dict(m) for m in prompt])
    missing = OpenEnvEnvironment(url=url, observation_field="prompt")
    with pytest.raises(openenv.EnvironmentProtocolError, match=r"observation_field='prompt': the observation has \['question'\]"):
        openenv.OpenEnvAgent(missing, "policy")("http://gw/episodes/s3:abcd/v1", "key", [dict(m) for m in prompt])
