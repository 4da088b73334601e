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
from rlhf_cluster.generation.engine import Turn, VLLMEngine, response_text
from rlhf_cluster.generation.environments import Environment


@dataclass
class EpisodeStats:
    """What an episode did, for metrics."""

    turns: int = 0
    tool_calls: int = 0
    tool_errors: dict[str, int] = field(default_factory=dict)  # by tool name
    environment_seconds: float = 0.0

    def count_step(self, info: dict) -> None:
        """An environment step's tool calls and errors (its result's `info`)."""
        self.tool_calls += info.get("tool_calls", 0)
        for kind in info.get("error_kinds", ()):
            self.tool_errors[kind] = self.tool_errors.get(kind, 0) + 1


@dataclass
class EpisodeResponse:
    """The response an episode builds within its token budget: model turns (loss mask 1) and
    observations (0), their tokens' log-probs, the weight-version spans of the model tokens (at
    each turn's offset) and where each turn starts."""

    budget: int
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    turn_starts: list[int] = field(default_factory=list)

    @property
    def left(self) -> int:
        """Tokens of the budget not written yet."""
        return self.budget - len(self.ids)

    def observe(self, token_ids: list[int]) -> None:
        """An observation's tokens, cut at the budget: log-prob 0, not trained on."""
        observation = token_ids[: self.left]
        self.ids.extend(observation)
        self.logprobs.extend([0.0] * len(observation))
        self.mask.extend([0] * len(observation))

    def add_turn(self, turn: Turn) -> bool:
        """Append a model turn; False (and nothing appended) when older weights than the last
        turn's wrote it: a rollback loaded them mid-episode."""
        if turn.token_ids:
            if self.spans and turn.spans[0][1] < self.spans[-1][1]:
                return False
            for start, version in turn.spans:  # at the turn's offset; a version that carries on is one span
                if not self.spans or version != self.spans[-1][1]:
                    self.spans.append((len(self.ids) + start, version))
        self.turn_starts.append(len(self.ids))
        self.ids.extend(turn.token_ids)
        self.logprobs.extend(turn.logprobs)
        self.mask.extend([1] * len(turn.token_ids))
        return True

    def rollout(
        self,
        engine: VLLMEngine,
        prompt: Prompt,
        prompt_ids: list[int],
        finish: FinishReason,
        turn_rewards: list[float],
        sample_id: str,
        group_id: str,
    ) -> Rollout:
        """The finished episode as a Rollout (no model token: one span of the engine's version)."""
        spans = self.spans or [(0, engine.version)]
        return Rollout(
            sample_id=sample_id,
            prompt_id=prompt.prompt_id,
            group_id=group_id,
            prompt_ids=list(prompt_ids),
            response_ids=self.ids,
            rollout_logprobs=self.logprobs,
            policy_version=spans[0][1],
            policy_versions=spans,
            finish_reason=finish,
            response_text=response_text(engine.tokenizer, self.ids),
            worker=engine.name,
            loss_mask=self.mask,
            turn_rewards=turn_rewards,
            turn_starts=self.turn_starts,
        )


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
    response = EpisodeResponse(cfg.sampling.max_new_tokens)
    stats = EpisodeStats()
    turn_rewards: list[float] = []
    finish: FinishReason = "stop"

    async def environment(call: Callable, *args):
        start = time.perf_counter()
        try:
            return await asyncio.to_thread(call, *args)
        finally:
            stats.environment_seconds += time.perf_counter() - start

    def observe(text: str) -> None:
        response.observe(tokenizer(text, add_special_tokens=False)["input_ids"])

    first = await environment(env.reset, prompt)
    if first:
        observe(first)
    while response.left > 0:
        limit = response.left if cfg.turn_max_tokens is None else min(cfg.turn_max_tokens, response.left)
        turn = await asyncio.wrap_future(engine.submit_turn(prompt_ids + response.ids, limit, cfg.turn_stop, greedy))
        if not response.add_turn(turn):
            finish = "abort"  # a rollback loaded older weights mid-episode: the driver discards this one anyway
            break
        stats.turns += 1
        finish = turn.finish_reason
        result = await environment(env.step, turn.text)
        turn_rewards.append(float(result.reward))
        stats.count_step(result.info)
        if result.done or stats.turns >= cfg.max_turns:
            break
        if result.observation:
            observe(result.observation)
        if response.left <= 0:
            finish = "length"
    rollout = response.rollout(engine, prompt, prompt_ids, finish, turn_rewards, sample_id, group_id)
    return rollout, stats
