"""Requests with images for a vLLM engine serving a vision-language model.

vLLM takes a prompt's images beside it as `multi_modal_data`: the prompt (its text, or its
token ids with one `<|image_pad|>` per image, as the chat template leaves them) and the images
in placeholder order; vLLM runs the model's processor, which repeats each placeholder once per
image token, so the request's `prompt_token_ids` in the engine's output are the expanded ones the
learner's processor gives too (`models/vision.py`). The engine needs `limit_mm_per_prompt` at
least the most images a prompt carries (`engine_mm_args`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.models.torchvision_ops import ensure_torchvision_importable


def image_request(prompt: str | Sequence[int], images: Sequence[Any]) -> dict[str, Any]:
    """The vLLM request of one prompt (chat-templated text, or its token ids) with its images
    (PIL images, one per placeholder, in order); a prompt without images is a plain request."""
    request: dict[str, Any] = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": list(prompt)}
    if images:
        request["multi_modal_data"] = {"image": list(images)}
    return request


def engine_mm_args(max_images_per_prompt: int) -> dict[str, Any]:
    """Engine arguments of an engine serving prompts of up to `max_images_per_prompt` images (and
    no video); makes torchvision importable first, since vLLM builds the model's processor."""
    if max_images_per_prompt < 1:
        raise ValueError(f"max_images_per_prompt must be >= 1, got {max_images_per_prompt}")
    ensure_torchvision_importable()
    return {"limit_mm_per_prompt": {"image": max_images_per_prompt, "video": 0}}


def serves_images(llm_engine) -> bool:
    """Whether a vLLM engine's model takes images (a vision-language model)."""
    return bool(llm_engine.model_config.is_multimodal_model)


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
