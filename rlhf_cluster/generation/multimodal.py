"""Requests with images for a vLLM engine serving a vision-language model.

vLLM takes a prompt's images beside it as `multi_modal_data`: the prompt (its text, or its
token ids with one `<|image_pad|>` per image, as the chat template leaves them) and the images
in placeholder order; vLLM runs the model's processor, which repeats each placeholder once per
image token, so the request's `prompt_token_ids` in the engine's output are the expanded ones the
learner's processor gives too (`models/vision.py`). The engine needs `limit_mm_per_prompt` at
least the most images a prompt carries (`engine_mm_args`).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.models.torchvision_ops import ensure_torchvision_importable


def image_request(prompt: str | Sequence[int], images: Sequence[Any]) -> dict[str, Any]:
    """The vLLM request of one prompt (chat-templated text, or its token ids) with its images
    (PIL images, one per placeholder, in order); a prompt without images is a plain request."""
    request: dict[str, Any] = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": list(prompt)}
    if images:
        request["multi_modal_data"] = {"image": list(images)}
    return request


@dataclass(frozen=True)
class EngineImages:
    """What an engine serving a vision-language model takes: at most `max_per_prompt` images a
    prompt, resized by its processor to between `min_pixels` and `max_pixels` (None: the model
    folder's setting; `data.min_pixels` / `max_pixels`, which the learner's processor uses too)."""

    max_per_prompt: int
    min_pixels: int | None = None
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        if self.max_per_prompt < 1:
            raise ValueError(f"max_images_per_prompt must be >= 1, got {self.max_per_prompt}")

    @property
    def processor_kwargs(self) -> dict[str, int]:
        """The processor's size settings that differ from the folder's."""
        sizes = {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels}
        return {k: v for k, v in sizes.items() if v is not None}


def engine_mm_args(images: EngineImages | int) -> dict[str, Any]:
    """Engine arguments of an engine serving prompts with `images` (an int: at most that many a
    prompt, sized as the folder says), and no video; makes torchvision importable first, since
    vLLM builds the model's processor."""
    if isinstance(images, int):
        images = EngineImages(images)
    ensure_torchvision_importable()
    args: dict[str, Any] = {"limit_mm_per_prompt": {"image": images.max_per_prompt, "video": 0}}
    if images.processor_kwargs:
        args["mm_processor_kwargs"] = images.processor_kwargs
    return args


def serves_images(llm_engine) -> bool:
    """Whether a vLLM engine's model takes images (a vision-language model)."""
    return bool(llm_engine.model_config.is_multimodal_model)


def image_token_id(llm_engine) -> int | None:
    """The image placeholder's token id of a vLLM engine's model (None: it takes no images)."""
    if not serves_images(llm_engine):
        return None
    return int(llm_engine.model_config.hf_config.image_token_id)


def placeholder_ids(llm_engine) -> frozenset[int]:
    """The image and video placeholder token ids of a vLLM engine's model (none: it takes no images)."""
    if not serves_images(llm_engine):
        return frozenset()
    config = llm_engine.model_config.hf_config
    return frozenset(int(t) for t in (config.image_token_id, getattr(config, "video_token_id", None)) if t is not None)


def fail_sampled_placeholders(rollouts: list[Rollout], placeholders: frozenset[int]) -> list[Rollout]:
    """`rollouts`, each one whose model sampled an image or video placeholder token failed
    (`Rollout.failure`: dropped and counted, never scored).

    The learner's model takes every placeholder in a sequence for an image's place, and a sampled
    one has no image: its forward would refuse the step (features and placeholders do not match).
    Tokens an environment wrote (an observation's images, `loss_mask` 0) are the images' own."""
    out = []
    for r in rollouts:
        sampled = r.loss_mask or [1] * len(r.response_ids)
        bad = sum(1 for t, m in zip(r.response_ids, sampled) if m and t in placeholders)
        if bad and not r.failure:
            r = dataclasses.replace(r, failure=f"the model sampled {bad} image/video placeholder token(s)")
        out.append(r)
    return out


def drop_image_embeddings(llm_engine) -> None:
    """Forget the image embeddings vLLM computed with the previous weights; call after every
    weight load of an engine that `serves_images`.

    vLLM keeps each image's encoder output, keyed by the image's hash, for every later request
    with the same image, and neither a weight load nor a prefix-cache reset drops it: after a
    push that changed the vision tower, a repeated image was still embedded by the old one
    (measured on the tiny VLM: log-probs off by 0.94 against the new weights, 1.4e-6 with this).
    vLLM warns when it runs with requests in flight (their embeddings may be recomputed)."""
    llm_engine.reset_encoder_cache()


def decoded_images(images: Sequence[bytes]) -> list[Any]:
    """A prompt's images (encoded bytes, `Prompt.images`) as the RGB PIL images vLLM's processor takes."""
    from PIL import Image

    return [Image.open(io.BytesIO(data)).convert("RGB") for data in images]


def collapsed_placeholders(ids: Sequence[int], image_token_id: int) -> list[int]:
    """`ids` with each run of image tokens collapsed back to one placeholder.

    A sequence the engine returned (an earlier turn's prompt) holds every image expanded to its
    tokens; sent again with its images, vLLM would expand each run's first token once more, so a
    later turn's context goes in as the chat template left it: one placeholder per image."""
    out: list[int] = []
    for token in ids:
        if token != image_token_id or not out or out[-1] != image_token_id:
            out.append(token)
    return out


def turn_request(context_ids: Sequence[int], images: Sequence[bytes], image_token_id: int | None) -> dict[str, Any]:
    """The vLLM request of an episode's next turn: its context (the prompt and the turns so far,
    images expanded as the engine returned them) with every image of it so far, in order."""
    if not images:
        return {"prompt_token_ids": list(context_ids)}
    if image_token_id is None:
        raise ValueError(f"a turn with {len(images)} image(s) for an engine whose model takes no images")
    return image_request(collapsed_placeholders(context_ids, image_token_id), decoded_images(images))


def engine_request(prompt: Prompt) -> Any:
    """The vLLM request of `prompt`: its chat-templated token ids (else its text), with its images
    decoded where it has any (`image_request`)."""
    if prompt.images:
        return image_request(
            prompt.token_ids if prompt.token_ids is not None else prompt.text, decoded_images(prompt.images)
        )
    if prompt.token_ids is None:
        return prompt.text
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=list(prompt.token_ids))
