"""`generation.agent.samples: turn` on real parts: an agent that rewrites its history (strips
earlier reasoning) trains with one sample per model turn; each trained sample's prompt is exactly
what the engine saw for that turn (the agent's messages as sent, through the chat template), its
tokens and log-probs exactly those the engine sent back, and every turn of an episode carries the
episode's reward and advantage."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from actors.job import run_job
from rlhf_cluster.gateway.chat import render
from rlhf_cluster.models.tiny_model import tiny_model_dir
from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.run.scored_log import ScoredLog
from tests.integration.strip_think_agent import TRACES


def test_an_agent_that_strips_its_reasoning_trains_turn_by_turn_on_what_the_engine_saw(ray_cluster, job_config):
    cfg = job_config(name="turn-samples", generation={
        "agent": {"function": "tests.integration.strip_think_agent:run", "timeout_s": 120, "samples": "turn"},
        "sampling": {"n": 4, "max_new_tokens": 32}, "turn_rewards": {"combine": "sum"}},
        train={"total_steps": 2, "prompts_per_step": 2, "max_staleness": 1, "progress": False,
               "record_rollouts": True})
    result = run_job(cfg)
    assert [r["step"] for r in result.rows] == [0, 1]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir(cfg.model.tiny, cfg.model.cache_dir))
    scored = [s for _, group in ScoredLog(Path(cfg.run_dir) / RunDir.SCORED_LOG).since(0) for s in group]
    episodes: dict[str, list] = defaultdict(list)
    for s in scored:
        episode, turn = s.sample_id.rsplit(":t", 1)
        episodes[episode].append((int(turn), s))
    assert len(episodes) >= 2 * 2 * 4 and all(len(turns) == 3 for turns in episodes.values())
    for episode, turns in episodes.items():
        [trace_file] = TRACES.glob(f"{episode}:*.json")
        calls = json.loads(trace_file.read_text())
        trace_file.unlink()
        for k, s in sorted(turns):
            call = calls[k]
            assert s.prompt_ids == tokenizer(render(tokenizer, call["sent"], None, True),
                                             add_special_tokens=False)["input_ids"]
            assert s.response_ids == call["token_ids"] and s.rollout_logprobs == pytest.approx(call["logprobs"])
            assert s.loss_mask is None or all(s.loss_mask)
        rewards = {s.reward for _, s in turns}
        advantages = {a for _, s in turns for a in s.advantages}
        assert len(rewards) == 1 and len(advantages) <= 1, (rewards, advantages)  # the episode's, on every turn
    assert any(s.reward_components.get("turn_reward") == 1.0 for s in scored)
