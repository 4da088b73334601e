"""Turns of episodes with images: the context as the engine saw it, and the trace grown to match.

An episode's context goes to the engine with one placeholder token per image (as the chat template
writes it) and every image so far (`multimodal.turn_request`); vLLM's processor expands each
placeholder to the image's run of image tokens. The trace the learner trains on must be those
expanded ids, so a turn comes back with the context the engine saw (`submit_turn_seen`), and the
trace's ids, loss mask, log-probs and indices grow where a placeholder it held became a run
(`expansions`, `grown`, `shifted`): the added tokens are the image's, masked out, log-prob 0.
A context whose placeholders the engine expanded otherwise (a mismatch anywhere) is an error, never
a silently misaligned sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import TypeVar

from rlhf_cluster.generation.engine import VLLMEngine

T = TypeVar("T")


class ExpansionError(ValueError):
    """The engine's context is not the one sent with its image placeholders expanded."""


def _run(ids: Sequence[int], start: int, token: int) -> int:
    end = start
    while end < len(ids) and ids[end] == token:
        end += 1
    return end - start


def expansions(sent: Sequence[int], seen: Sequence[int], image_token_id: int | None) -> list[tuple[int, int]]:
    """Where `seen` (the engine's context) adds tokens to `sent`: (index in `sent` before which
    they go, how many), one per placeholder of `sent` that the engine expanded to a run (a run
    `sent` holds already expanded stays as it is). Empty when the two are equal."""
    if list(sent) == list(seen):
        return []
    if image_token_id is None:
        raise ExpansionError(f"the engine saw {len(seen)} tokens for a context of {len(sent)} without images")
    out: list[tuple[int, int]] = []
    i = j = 0
    while i < len(sent) and j < len(seen):
        if sent[i] != seen[j]:
            raise ExpansionError(
                f"the engine's context differs from the one sent at token {i} ({sent[i]} vs {seen[j]})"
            )
        if sent[i] != image_token_id:
            i, j = i + 1, j + 1
            continue
        here, there = _run(sent, i, image_token_id), _run(seen, j, image_token_id)
        if here == 1 and there > 1:
            out.append((i + 1, there - 1))
        elif here != there:
            raise ExpansionError(f"an image's {here} tokens at {i} came back as {there}")
        i, j = i + here, j + there
    if i != len(sent) or j != len(seen):
        raise ExpansionError(f"the engine saw {len(seen)} tokens for a context of {len(sent)}: not its expansion")
    return out


def grown(values: Sequence[T], inserts: Sequence[tuple[int, int]], fill: T) -> list[T]:
    """`values` with `n` copies of `fill` before index `at` for each (at, n) of `inserts`."""
    out: list[T] = []
    last = 0
    for at, n in sorted(inserts):
        out += list(values[last:at]) + [fill] * n
        last = at
    return out + list(values[last:])


def shifted(index: int, inserts: Sequence[tuple[int, int]]) -> int:
    """Where index `index` of a sequence is once `inserts` (as `grown`) went in."""
    return index + sum(n for at, n in inserts if at <= index)


def count_placeholders(ids: Sequence[int], image_token_id: int | None) -> int:
    """Images a context holds: its runs of image tokens (one placeholder, or one expanded image)."""
    if image_token_id is None:
        return 0
    return sum(1 for k, t in enumerate(ids) if t == image_token_id and (k == 0 or ids[k - 1] != image_token_id))


def submit_turn_seen(
    engine: VLLMEngine,
    context_ids: list[int],
    max_tokens: int,
    stop: list[str],
    greedy: bool,
    images: Sequence[bytes],
) -> Future:
    """`engine.submit_turn` with the context's images, resolving to `(Turn, the context as the
    engine saw it)`: its prompt ids, each image expanded to its tokens (`Turn.context_ids`)."""
    seen: Future = Future()

    def done(turn: Future) -> None:
        try:
            result = turn.result()
        except BaseException as exc:  # the turn's error is the caller's to see
            seen.set_exception(exc)
        else:
            seen.set_result((result, result.context_ids))

    engine.submit_turn(context_ids, max_tokens, stop, greedy, images).add_done_callback(done)
    return seen


def image_placeholder(tokenizer) -> str:
    """The text the model's chat template writes for one image in a message (e.g. Qwen's
    `<|vision_start|><|image_pad|><|vision_end|>`): what an observation's image is shown as."""
    before, after = "\u2063before\u2063", "\u2063after\u2063"
    content = [{"type": "text", "text": before}, {"type": "image"}, {"type": "text", "text": after}]
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
    placeholder = str(text).partition(before)[2].partition(after)[0]
    if not placeholder:
        raise ValueError("the chat template writes nothing for an image part: the model takes no images")
    return placeholder


class ImageTurns:
    """A vision-language engine's side of an episode with images: its image token, the images a
    context may carry (`limit_mm_per_prompt`; 0: a text-only model), an image's placeholder text,
    and its turns (`submit_turn_seen`)."""

    def __init__(self, engine: VLLMEngine):
        from rlhf_cluster.generation.multimodal import image_token_id

        self.engine = engine
        self.token_id = image_token_id(engine.engine)
        mm = engine.engine.model_config.multimodal_config
        self.limit = 0 if self.token_id is None or mm is None else mm.get_limit_per_prompt("image")
        self.placeholder = image_placeholder(engine.tokenizer) if self.limit else ""

    def refusal(self, context: Sequence[int], images: Sequence[bytes]) -> str | None:
        """Why `context` with `images` cannot go to the engine (None: it can)."""
        if not self.limit:
            return f"{len(images)} image(s) for a text-only policy"
        if len(images) > self.limit:
            return f"{len(images)} images; the engine takes at most {self.limit} (data.max_images_per_prompt)"
        placed = count_placeholders(context, self.token_id)
        if placed != len(images):
            return f"the context holds {placed} image placeholders for {len(images)} images"
        return None

    def submit(self, context_ids: list[int], max_tokens: int, stop: list[str], greedy: bool, images) -> Future:
        return submit_turn_seen(self.engine, context_ids, max_tokens, stop, greedy, images)
