"""Environments for multi-turn episodes: the model writes a turn, the environment answers with an
observation (appended as tokens the policy is not trained on), until it is done. Ray-free.

An environment is named in config like a reward function (`module:Class`; built-in: `tools`,
`tools_rewarded`, `scripted`).
`reset(prompt)` starts an episode and returns the first observation ("" for none); `step(turn)`
takes the model's turn and returns the next observation, a reward for the turn, whether the
episode is over, and diagnostics.

An observation is text, or for a vision-language policy an `Observation` of text and images (a
screenshot, a rendered board): the episode shows the images before the text, each as the model's
image placeholder, and keeps them in its trace (`Rollout.images`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.tools.calls import ToolParser, parse_tool_calls, run_tool
from rlhf_cluster.tools.sandbox import SandboxLimits
from rlhf_cluster.user_code import import_spec


@dataclass(frozen=True)
class Observation:
    """An observation with images: `images` (encoded PNG/JPEG bytes) shown before `text`."""

    text: str = ""
    images: tuple[bytes, ...] = ()


@dataclass
class StepResult:
    """What the environment answers to one model turn."""

    observation: str | Observation
    reward: float = 0.0
    done: bool = False
    info: dict = field(default_factory=dict)


class Environment:
    """One episode at a time; a subclass implements `reset` and `step`."""

    def reset(self, prompt: Prompt) -> str | Observation:
        raise NotImplementedError

    def step(self, turn: str) -> StepResult:
        raise NotImplementedError


class ToolEnvironment(Environment):
    """Runs the tool calls in each model turn and answers with their results; a turn without a
    call is the final answer (the episode ends, and the verifier scores the whole response), as
    does reaching `max_turns`."""

    def __init__(
        self, max_turns: int = 4, parser: ToolParser = parse_tool_calls, limits: SandboxLimits = SandboxLimits()
    ):
        self.max_turns, self.parser, self.limits = max_turns, parser, limits
        self.turns = 0

    def reset(self, prompt: Prompt) -> str:
        self.turns = 0
        return ""

    def step(self, turn: str) -> StepResult:
        self.turns += 1
        calls = self.parser(turn)
        if not calls:
            return StepResult("", done=True, info={"tool_calls": 0, "tool_errors": 0})
        start = time.monotonic()
        results = [run_tool(call, self.limits) for call in calls]
        errors = [r for r in results if r.error is not None]
        return StepResult(
            "".join(r.observation() for r in results),
            done=self.turns >= self.max_turns,
            info={
                "tool_calls": len(calls),
                "tool_errors": len(errors),
                "tool_seconds": time.monotonic() - start,
                "error_kinds": [r.name for r in errors],
            },
        )


class ScriptedEnvironment(Environment):
    """Answers model turn k with the fixed observation "\n[observation k]\n" and the turn reward
    k / 10, and ends the episode at `max_turns`: multi-turn plumbing without a task (tests, smoke runs)."""

    def __init__(self, max_turns: int = 3):
        self.max_turns = max_turns
        self.turns = 0

    @staticmethod
    def observation(turn: int) -> str:
        return f"\n[observation {turn}]\n"

    def reset(self, prompt: Prompt) -> str:
        self.turns = 0
        return ""

    def step(self, turn: str) -> StepResult:
        self.turns += 1
        return StepResult(self.observation(self.turns), reward=self.turns / 10, done=self.turns >= self.max_turns)


class RewardedToolEnvironment(ToolEnvironment):
    """`ToolEnvironment` that also rewards each turn's tool calls that ran without an error
    (`CALL_REWARD` each): the example of per-turn rewards (`generation.turn_rewards` combines them
    with the verifier's final reward). Built in as `tools_rewarded`."""

    CALL_REWARD = 0.1

    def step(self, turn: str) -> StepResult:
        result = super().step(turn)
        succeeded = result.info.get("tool_calls", 0) - result.info.get("tool_errors", 0)
        result.reward = self.CALL_REWARD * succeeded
        return result


BUILT_IN = {"tools": ToolEnvironment, "tools_rewarded": RewardedToolEnvironment, "scripted": ScriptedEnvironment}


def load_environment(spec: str, field: str = "generation.environment") -> type[Environment]:
    """The environment class `spec` names: a built-in (`tools`) or `module:Class`."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    found = import_spec(spec, field, kind="Class", example="my_envs:Sokoban")
    if not (isinstance(found, type) and all(callable(getattr(found, m, None)) for m in ("reset", "step"))):
        raise ValueError(
            f"{field}={spec!r}: expected a class with reset(prompt) and step(turn) methods, got {type(found).__name__}"
        )
    return found
