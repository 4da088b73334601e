"""Multi-turn episodes: the engine writes a turn, the environment answers, its observation is
appended as tokens the policy is not trained on, until the environment is done, `max_turns`
model turns were written or the response budget (`sampling.max_new_tokens`) is spent. Ray-free.

Every model token keeps the log-prob it was sampled with and the weight version that sampled it:
each turn is its own engine request over the whole context so far, and its version spans are
placed at the turn's offset in the response. Observation tokens get log-prob 0, loss mask 0,
and belong to the span of the model token before them. The environment runs in a thread, never
on the engine loop, so a slow tool does not stall other requests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rlhf_cluster.config import GenerationConfig
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.experience.records import FinishReason, Rollout
from rlhf_cluster.generation.engine import VLLMEngine, response_text
from rlhf_cluster.generation.environments import Environment


@dataclass
class EpisodeStats:
    """What an episode did, for metrics."""

    turns: int = 0
    tool_calls: int = 0
    tool_errors: dict[str, int] = field(default_factory=dict)  # by tool name
    environment_seconds: float = 0.0


async def run_episode(
    engine: VLLMEngine,
    cfg: GenerationConfig,
    prompt: Prompt,
    env: Environment,
    sample_id: str,
    group_id: str,
    greedy: bool = False,
) -> tuple[Rollout, EpisodeStats]:
    """One episode of `prompt` in `env` on `engine`: a Rollout whose response interleaves model
    turns (loss mask 1) and observations (0)."""
    tokenizer = engine.tokenizer
    prompt_ids = prompt.encode(tokenizer)
    budget = cfg.sampling.max_new_tokens
    ids: list[int] = []
    logprobs: list[float] = []
    mask: list[int] = []
    spans: list[tuple[int, int]] = []
    stats = EpisodeStats()
    turn_rewards: list[float] = []
    turn_starts: list[int] = []
    finish: FinishReason = "stop"

    async def environment(call: Callable, *args):
        start = time.perf_counter()
        try:
            return await asyncio.to_thread(call, *args)
        finally:
            stats.environment_seconds += time.perf_counter() - start

    def observe(text: str) -> None:
        observation = tokenizer(text, add_special_tokens=False)["input_ids"][: budget - len(ids)]
        ids.extend(observation)
        logprobs.extend([0.0] * len(observation))
        mask.extend([0] * len(observation))

    first = await environment(env.reset, prompt)
    if first:
        observe(first)
    while len(ids) < budget:
        limit = budget - len(ids) if cfg.turn_max_tokens is None else min(cfg.turn_max_tokens, budget - len(ids))
        turn = await asyncio.wrap_future(engine.submit_turn(prompt_ids + ids, limit, cfg.turn_stop, greedy))
        if turn.token_ids:
            if spans and turn.spans[0][1] < spans[-1][1]:
                finish = "abort"  # a rollback loaded older weights mid-episode: the driver discards this one anyway
                break
            for start, version in turn.spans:  # at the turn's offset; a version that carries on is one span
                if not spans or version != spans[-1][1]:
                    spans.append((len(ids) + start, version))
        turn_starts.append(len(ids))
        ids.extend(turn.token_ids)
        logprobs.extend(turn.logprobs)
        mask.extend([1] * len(turn.token_ids))
        stats.turns += 1
        finish = turn.finish_reason
        result = await environment(env.step, turn.text)
        turn_rewards.append(float(result.reward))
        stats.tool_calls += result.info.get("tool_calls", 0)
        for kind in result.info.get("error_kinds", ()):
            stats.tool_errors[kind] = stats.tool_errors.get(kind, 0) + 1
        if result.done or stats.turns >= cfg.max_turns:
            break
        if result.observation:
            observe(result.observation)
        if len(ids) >= budget:
            finish = "length"
    if not spans:
        spans = [(0, engine.version)]
    rollout = Rollout(
        sample_id=sample_id,
        prompt_id=prompt.prompt_id,
        group_id=group_id,
        prompt_ids=list(prompt_ids),
        response_ids=ids,
        rollout_logprobs=logprobs,
        policy_version=spans[0][1],
        policy_versions=spans,
        finish_reason=finish,
        response_text=response_text(tokenizer, ids),
        worker=engine.name,
        loss_mask=mask,
        turn_rewards=turn_rewards,
        turn_starts=turn_starts,
    )
    return rollout, stats
