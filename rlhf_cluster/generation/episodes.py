"""Multi-turn episodes: the engine writes a turn, the environment answers, its observation is
appended as tokens the policy is not trained on, until the environment is done, `max_turns`
model turns were written or the response budget (`sampling.max_new_tokens`) is spent. Ray-free.

Every model token keeps the log-prob it was sampled with and the weight version that sampled it:
each turn is its own engine request over the whole context so far, and its version spans are
placed at the turn's offset in the response. Observation tokens get log-prob 0, loss mask 0,
and belong to the span of the model token before them. The environment runs in a thread, never
on the engine loop, so a slow tool does not stall other requests.

With images (a vision-language policy's prompt images, or an `Observation`'s), every turn goes to
the engine with all the images so far, one placeholder each; the engine expands them to their
tokens and the episode keeps the context as the engine saw it (`EpisodeResponse.saw`), the images
in order (`Rollout.images`). Images the engine cannot take (more than its limit, a text-only
policy, an unreadable one) end the episode as a failed sample (`Rollout.failure`, dropped and
counted), never the worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from rlhf_cluster.config import GenerationConfig
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.experience.records import FinishReason, Rollout
from rlhf_cluster.generation.engine import VLLMEngine
from rlhf_cluster.generation.engine_outputs import Turn, response_text
from rlhf_cluster.generation.environments import Environment, Observation
from rlhf_cluster.generation.image_turns import ImageTurns, count_placeholders, expansions, grown, shifted

log = logging.getLogger(__name__)


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
    images: list[bytes] = field(default_factory=list)  # the prompt's, then the observations', in order

    @property
    def left(self) -> int:
        """Tokens of the budget not written yet."""
        return self.budget - len(self.ids)

    def observe(self, token_ids: list[int]) -> list[int]:
        """An observation's tokens, cut at the budget: log-prob 0, not trained on; returns those kept."""
        observation = token_ids[: self.left]
        self.ids.extend(observation)
        self.logprobs.extend([0.0] * len(observation))
        self.mask.extend([0] * len(observation))
        return observation

    def saw(self, prompt_ids: list[int], sent: list[int], seen: list[int], image_token_id: int | None) -> list[int]:
        """The engine saw `seen` for the context `sent` (`prompt_ids` then these ids): the response
        grows where it expanded an image placeholder (the image's tokens masked out, log-prob 0,
        later indices shifted); returns the prompt's ids as the engine saw them."""
        inserts = expansions(sent, seen, image_token_id)
        p = len(prompt_ids)
        in_prompt = sum(n for at, n in inserts if at <= p)
        later = [(at - p, n) for at, n in inserts if at > p]
        self.ids = list(seen[p + in_prompt :])
        self.logprobs = grown(self.logprobs, later, 0.0)
        self.mask = grown(self.mask, later, 0)
        self.spans = [(shifted(start, later), v) for start, v in self.spans]
        self.turn_starts = [shifted(start, later) for start in self.turn_starts]
        return list(seen[: p + in_prompt])

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
            images=tuple(self.images),
        )


class ImagesRefused(ValueError):
    """Images an episode's engine cannot take: the episode ends as a failed sample."""


class _Turns:
    """An episode's engine turns and observations, with its images where it has any (the
    engine's side, `ImageTurns`, built at the first image)."""

    def __init__(self, engine: VLLMEngine, response: EpisodeResponse):
        self.engine, self.response = engine, response
        self._turns: ImageTurns | None = None

    @property
    def turns(self) -> ImageTurns:
        if self._turns is None:
            self._turns = ImageTurns(self.engine)
        return self._turns

    def shown(self, observation: str | Observation) -> tuple[str, tuple[bytes, ...]]:
        """An observation's text with its images' placeholders before it, and its images (checked)."""
        from rlhf_cluster.data.images import ImageError, check_image
        from rlhf_cluster.data.prompts import MAX_IMAGE_BYTES

        if isinstance(observation, str):
            return observation, ()
        images = tuple(observation.images)
        if not images:
            return observation.text, ()
        if not self.turns.limit:
            raise ImagesRefused(f"an observation with {len(images)} image(s) for a text-only policy")
        for k, data in enumerate(images):
            try:
                if len(data) > MAX_IMAGE_BYTES:
                    raise ImageError(f"{len(data):,} bytes, over {MAX_IMAGE_BYTES:,}")
                check_image(data, f"the observation's image {k}")
            except ImageError as exc:
                raise ImagesRefused(str(exc)) from None
        return self.turns.placeholder * len(images) + observation.text, images

    def observe(self, observation: str | Observation) -> None:
        """An observation appended to the response, its images kept where the budget left their placeholders."""
        tokenizer = self.engine.tokenizer
        text, images = self.shown(observation)
        kept = self.response.observe(tokenizer(text, add_special_tokens=False)["input_ids"])
        if images:
            self.response.images += images[: count_placeholders(kept, self.turns.token_id)]

    async def turn(self, prompt_ids: list[int], limit: int, stop: list[str], greedy: bool) -> tuple[Turn, list[int]]:
        """The model's next turn after the prompt and the response so far, and the prompt's ids
        as the engine saw them (its images expanded)."""
        response, context = self.response, prompt_ids + self.response.ids
        if not response.images:
            return await asyncio.wrap_future(self.engine.submit_turn(context, limit, stop, greedy)), prompt_ids
        turns = self.turns
        why = turns.refusal(context, response.images)
        if why is not None:
            raise ImagesRefused(why)
        try:
            turn, seen = await asyncio.wrap_future(turns.submit(context, limit, stop, greedy, response.images))
        except Exception as exc:  # the engine refused the request (its images): this sample only
            raise ImagesRefused(f"the engine refused the context's images: {type(exc).__name__}: {exc}") from exc
        return turn, response.saw(prompt_ids, context, seen, turns.token_id)


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
    turns (loss mask 1) and observations (0); with images the engine could not take, a failed one."""
    tokenizer = engine.tokenizer
    prompt_ids = prompt.encode(tokenizer)
    response = EpisodeResponse(cfg.sampling.max_new_tokens, images=list(prompt.images))
    stats = EpisodeStats()
    turn_rewards: list[float] = []
    finish: FinishReason = "stop"
    turns = _Turns(engine, response)

    async def environment(call: Callable, *args):
        start = time.perf_counter()
        try:
            return await asyncio.to_thread(call, *args)
        finally:
            stats.environment_seconds += time.perf_counter() - start

    failure = ""
    try:
        first = await environment(env.reset, prompt)
        if first:
            turns.observe(first)
        while response.left > 0:
            limit = response.left if cfg.turn_max_tokens is None else min(cfg.turn_max_tokens, response.left)
            turn, prompt_ids = await turns.turn(prompt_ids, limit, cfg.turn_stop, greedy)
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
                turns.observe(result.observation)
            if response.left <= 0:
                finish = "length"
    except ImagesRefused as exc:
        failure = f"episode {sample_id}: {exc}"
        log.warning(failure)
    rollout = response.rollout(engine, prompt, prompt_ids, finish, turn_rewards, sample_id, group_id)
    return (replace(rollout, failure=failure) if failure else rollout), stats
