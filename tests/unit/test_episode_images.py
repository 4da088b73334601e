"""Environment episodes with images, without vLLM: an `Observation`'s images are shown as the
model's placeholder before its text, every turn goes to the engine with all the images so far,
and the rollout is the context as the engine saw it (each image expanded, masked out) with its
images in order; images the engine cannot take fail the sample, never the worker."""

from __future__ import annotations

import asyncio
import io
from concurrent.futures import Future

import pytest
from PIL import Image

from rlhf_cluster.config import GenerationConfig
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.generation import episodes
from rlhf_cluster.generation.environments import Environment, Observation, StepResult
from rlhf_cluster.generation.image_turns import ImageTurns
from tests.unit.test_episode_response import ScriptedEngine, _turn

PAD = ord("#")


def png(width: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, 8), "red").save(out, format="PNG")
    return out.getvalue()


def chars(text: str) -> list[int]:
    return [ord(c) for c in text]


class FakeImageTurns(ImageTurns):
    """`ImageTurns` of a character-level engine: `[#]` per image, expanded to width / 8 `#`s."""

    limit = 2
    requests: list[tuple[list[int], tuple[bytes, ...]]] = []

    def __init__(self, engine):
        self.engine, self.token_id, self.placeholder = engine, PAD, "[#]"

    def submit(self, context_ids, max_tokens, stop, greedy, images) -> Future:
        collapsed = [t for k, t in enumerate(context_ids) if t != PAD or context_ids[k - 1] != PAD]
        widths = iter(Image.open(io.BytesIO(i)).size[0] // 8 for i in images)
        seen = [u for t in collapsed for u in ([t] * next(widths) if t == PAD else [t])]
        self.requests.append((seen, tuple(images)))
        future: Future = Future()
        future.set_result((self.engine.turns.pop(0), seen))
        return future


class Screens(Environment):
    def __init__(self, shown: tuple[bytes, ...]):
        self.shown = shown

    def reset(self, prompt):
        return ""

    def step(self, turn):
        return StepResult(Observation("ok", self.shown), done=turn.endswith("!"))


def _run(monkeypatch, shown: tuple[bytes, ...], limit: int = 2):
    monkeypatch.setattr(episodes, "ImageTurns", FakeImageTurns)
    monkeypatch.setattr(FakeImageTurns, "limit", limit)
    monkeypatch.setattr(FakeImageTurns, "requests", [])
    engine = ScriptedEngine([_turn("ab", [(0, 1)]), _turn("cd!", [(0, 2)])])
    prompt = Prompt("p0", "[#]hi", "1", token_ids=tuple(chars("[#]hi")), images=(png(16),))
    cfg = GenerationConfig(sampling={"max_new_tokens": 40})
    rollout, _ = asyncio.run(episodes.run_episode(engine, cfg, prompt, Screens(shown), "s0", "g0"))  # type: ignore[arg-type]
    return rollout, FakeImageTurns.requests, engine


def test_an_observations_image_is_in_the_trace_as_the_engine_saw_it(monkeypatch):
    screen = png(40)
    rollout, requests, engine = _run(monkeypatch, (screen,))
    assert not rollout.failure and engine.requests == []  # every turn went with the images
    assert [images for _, images in requests] == [(rollout.images[0],), rollout.images]
    assert rollout.images[1] == screen
    assert rollout.prompt_ids == chars("[##]hi")  # the prompt's image: 2 tokens
    assert rollout.response_ids == chars("ab[#####]okcd!")  # the observation's: 5, masked out
    assert rollout.loss_mask == [1, 1] + [0] * 9 + [1, 1, 1]
    assert rollout.rollout_logprobs == [-0.5] * 2 + [0.0] * 9 + [-0.5] * 3
    assert rollout.turn_starts == [0, 11] and rollout.policy_versions == [(0, 1), (11, 2)]
    assert requests[1][0] == rollout.prompt_ids + rollout.response_ids[:11]


@pytest.mark.parametrize(
    ("shown", "limit", "says"),
    [
        ((png(16), png(16)), 2, "3 images; the engine takes at most 2"),
        ((png(16),), 0, "for a text-only policy"),
        ((b"\x89PNG not really",), 2, "not a readable image"),
    ],
)
def test_images_the_engine_cannot_take_fail_the_sample(monkeypatch, shown, limit, says):
    rollout, _, _ = _run(monkeypatch, shown, limit)
    assert says in rollout.failure  # (the text-only policy refuses the prompt's own image, at the first turn)
