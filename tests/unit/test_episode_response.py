"""An episode's response without vLLM: model turns and observations interleaved within the token
budget, weight-version spans at each turn's offset, a rollback mid-episode aborts it."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future

from rlhf_cluster.config import GenerationConfig
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.generation.engine_outputs import Turn
from rlhf_cluster.generation.environments import Environment, StepResult
from rlhf_cluster.generation.episodes import EpisodeResponse, run_episode


class CharTokenizer:
    """One token per character."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)


def _turn(text: str, spans: list[tuple[int, int]], finish="stop") -> Turn:
    return Turn([ord(c) for c in text], [-0.5] * len(text), spans, finish, text)


class ScriptedEngine:
    """Answers each turn from a script; records the context and token limit of each request."""

    def __init__(self, turns: list[Turn]):
        self.tokenizer, self.version, self.name = CharTokenizer(), 7, "gen0"
        self.turns, self.requests = list(turns), []

    def submit_turn(self, context_ids, max_tokens, stop, greedy=False) -> Future:
        self.requests.append((list(context_ids), max_tokens))
        future: Future = Future()
        future.set_result(self.turns.pop(0))
        return future


class Echo(Environment):
    def reset(self, prompt):
        return ""

    def step(self, turn):
        return StepResult("ok", reward=1.0, done=turn.endswith("!"), info={"tool_calls": 1, "error_kinds": ["x"]})


def _run(turns: list[Turn], max_new_tokens: int = 20, **generation):
    engine = ScriptedEngine(turns)
    cfg = GenerationConfig(sampling={"max_new_tokens": max_new_tokens}, **generation)
    prompt = Prompt("p0", "hi", "1")
    rollout, stats = asyncio.run(run_episode(engine, cfg, prompt, Echo(), "s0", "g0"))  # type: ignore[arg-type]
    return engine, rollout, stats


def test_turns_and_observations_interleave():
    engine, rollout, stats = _run([_turn("ab", [(0, 1)]), _turn("cd!", [(0, 1), (1, 2)])], turn_max_tokens=5)
    assert rollout.response_text == "abokcd!"
    assert rollout.loss_mask == [1, 1, 0, 0, 1, 1, 1]
    assert rollout.rollout_logprobs == [-0.5, -0.5, 0.0, 0.0, -0.5, -0.5, -0.5]
    assert rollout.policy_versions == [(0, 1), (5, 2)] and rollout.policy_version == 1
    assert rollout.turn_starts == [0, 4] and rollout.turn_rewards == [1.0, 1.0]
    assert rollout.finish_reason == "stop"
    assert [limit for _, limit in engine.requests] == [5, 5]
    assert engine.requests[1][0] == [ord(c) for c in "hiabok"]  # the prompt and the episode so far
    assert (stats.turns, stats.tool_calls, stats.tool_errors) == (2, 2, {"x": 2})


def test_the_budget_cuts_an_observation_and_ends_the_episode():
    _, rollout, _ = _run([_turn("abcd", [(0, 1)])], max_new_tokens=5)
    assert rollout.response_text == "abcdo"  # "ok" cut at the budget
    assert rollout.finish_reason == "length"


def test_older_weights_mid_episode_abort_it():
    _, rollout, stats = _run([_turn("ab", [(0, 3)]), _turn("cd", [(0, 2)])])
    assert rollout.finish_reason == "abort"
    assert rollout.response_text == "abok" and rollout.turn_starts == [0]  # the older turn is left out
    assert stats.turns == 1


def test_no_model_token_is_one_span_of_the_engines_version():
    response = EpisodeResponse(budget=4)
    response.observe([1, 2, 3, 4, 5])
    assert response.ids == [1, 2, 3, 4] and response.left == 0
    rollout = response.rollout(ScriptedEngine([]), Prompt("p0", "hi", "1"), [1], "length", [], "s0", "g0")  # type: ignore[arg-type]
    assert rollout.policy_versions == [(0, 7)]
