"""A judge that is a vision-language model sees each sample's images (a group's shared ones) with
its prompt, each placed once by its own template; a text-only judge gets none and the text it got
before; a sample with more images than the judge's engine takes is not judged (dropped, counted).
The worker's own code over a fake engine (no Ray actor, no vLLM)."""

from __future__ import annotations

import io
from concurrent.futures import Future

import pytest
from PIL import Image
from transformers import AutoTokenizer

from actors.workers.judge import JudgeWorker
from rlhf_cluster.config import TinyModelConfig
from rlhf_cluster.config.scoring import JudgeReward
from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.generation.engine_outputs import Turn
from rlhf_cluster.generation.image_turns import count_placeholders, image_placeholder
from rlhf_cluster.models.tiny_model import ensure_tiny_model
from rlhf_cluster.models.tiny_vlm import IMAGE_PAD
from rlhf_cluster.scoring.judge import VerdictReader, judge_prompt_ids, shared_images, without_images

MAX_IMAGES = 4  # data.max_images_per_prompt's default
MARKUP = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPT = f"<|im_start|>user\n{MARKUP}How many dots?<|im_end|>\n<|im_start|>assistant\n"


def png(colour: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (28, 28), colour).save(out, format="PNG")
    return out.getvalue()


RED, BLUE = png("red"), png("blue")


@pytest.fixture(scope="module")
def vlm_tokenizer(model_cache):
    return AutoTokenizer.from_pretrained(ensure_tiny_model(TinyModelConfig(architecture="qwen2_5_vl"), model_cache))


class FakeEngine:
    def __init__(self):
        self.calls: list[tuple[list[int], tuple[bytes, ...]]] = []

    def submit_turn(self, ids, max_tokens, stop, greedy=False, images=()) -> Future:
        self.calls.append((list(ids), tuple(images)))
        future: Future = Future()
        future.set_result(Turn([1], [0.0], [(0, 0)], "stop", "yes"))
        return future


def worker(tokenizer, sees_images: bool, group: bool = False):
    """A JudgeWorker's state without its actor and engine (what `__init__` sets for the judge's part)."""
    judge = object.__new__(JudgeWorker.__ray_metadata__.modified_class)
    source = JudgeReward(
        model="judge",
        template="best_of_group" if group else "correctness",
        verdict="choice" if group else "yes_no",
        group=group,
    )
    judge.source, judge.tokenizer, judge.engine = source, tokenizer, FakeEngine()
    judge.image_token = tokenizer.convert_tokens_to_ids(IMAGE_PAD) if sees_images else None
    judge.placeholder = image_placeholder(tokenizer) if sees_images else ""
    judge.max_images = MAX_IMAGES
    judge.reader = VerdictReader(source.name, source.verdict)
    judge._counted = (0, 0, 0)
    judge._export = lambda: None
    return judge


def rollout(sample: str, images: tuple[bytes, ...], group: str = "g") -> Rollout:
    return Rollout(sample, "p", group, [], [], [], 0, finish_reason="stop", response_text="three", images=images)


def test_placeholders_come_out_and_a_group_shares_its_first_images():
    assert without_images(PROMPT) == "<|im_start|>user\nHow many dots?<|im_end|>\n<|im_start|>assistant\n"
    assert without_images("a [img] b", ["[img]"]) == "a  b"
    assert shared_images([(RED, BLUE), (RED, RED), (RED,)]) == (RED,) and shared_images([(RED,), (BLUE,)]) == ()


def test_a_vision_judge_prompt_places_each_image_once(vlm_tokenizer):
    pad = vlm_tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    ids = judge_prompt_ids(vlm_tokenizer, "Is it right?", 2)
    assert count_placeholders(ids, pad) == 2 and "Is it right?" in vlm_tokenizer.decode(ids)
    assert count_placeholders(judge_prompt_ids(vlm_tokenizer, "Is it right?"), pad) == 0


def test_a_vision_judge_sees_the_samples_images_and_a_text_judge_none(vlm_tokenizer):
    pad = vlm_tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    items = [(rollout("s0", (RED,)), PROMPT, "3"), (rollout("s1", ()), "2+2?", "4")]
    seeing = worker(vlm_tokenizer, sees_images=True)
    assert seeing.judge(items) == [1.0, 1.0]
    (ids, images), (text_ids, no_images) = seeing.engine.calls
    assert images == (RED,) and count_placeholders(ids, pad) == 1  # the prompt text's own placeholder taken out
    assert no_images == () and text_ids == judge_prompt_ids(vlm_tokenizer, seeing._units(items)[1][0])
    blind = worker(vlm_tokenizer, sees_images=False)
    assert blind.judge(items) == [1.0, 1.0]
    assert [i for _, i in blind.engine.calls] == [(), ()] and count_placeholders(blind.engine.calls[0][0], pad) == 0


def test_a_group_judge_sees_the_shared_images_and_too_many_are_not_judged(vlm_tokenizer):
    group = worker(vlm_tokenizer, sees_images=True, group=True)
    items = [(rollout("s0", (RED, BLUE)), PROMPT, "3"), (rollout("s1", (RED, RED)), PROMPT, "3")]
    group.judge(items)
    assert [i for _, i in group.engine.calls] == [(RED,)]
    seeing = worker(vlm_tokenizer, sees_images=True)
    many = (RED,) * (MAX_IMAGES + 1)
    assert seeing.judge([(rollout("s0", many), PROMPT, "3")]) == [None]
    assert seeing.engine.calls == [] and seeing.reader.errors == 1
