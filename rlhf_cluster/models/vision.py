"""Vision-language models on the learner's side: a sample's processor outputs and the per-token
log-probs of its response given its images.

A Qwen2.5-VL-style model takes, besides the token ids, the images' `pixel_values` (every 14x14
patch of every image, flattened, all images of the sample concatenated) and `image_grid_thw`
(each image's grid of patches: time, height, width), and runs its rotary embedding on three
position ids per token (time, height, width: `rope_positions`), which the model's own
`get_rope_index` derives from the ids and the grids. The prompt's ids are the processor's: the
chat template puts one `<|image_pad|>` per image and the processor repeats it once per image
token, as vLLM does for the engine (whose prompt ids are the same; the parity test checks it).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf_cluster.models.torchvision_ops import ensure_torchvision_importable

IMAGE, VIDEO = 1, 2  # `mm_token_type_ids` values of image and video tokens (text is 0)

# transformers 5 holds a Qwen2-VL / Qwen2.5-VL as `model.visual.*` and `model.language_model.*`,
# while their folders (what `save_pretrained` writes and an engine is built from) keep the
# original `visual.*` and `model.*`: a version pushed to an engine must carry the folder's names.
_CHECKPOINT_PREFIXES = (("model.visual.", "visual."), ("model.language_model.", "model."))
CHECKPOINT_RENAMED = frozenset({"qwen2_vl", "qwen2_5_vl"})
# The vision tower and its projector (Qwen's `visual.merger`), under either layout's names:
# what `learner.freeze_vision` freezes and never sends to an engine.
VISION_PREFIXES = ("model.visual.", "visual.")


@dataclass
class VisionSample:
    """One sample's model inputs: prompt then response ids, the images' patches and grids."""

    input_ids: torch.Tensor  # [L] long: the prompt (images expanded to their tokens) then the response
    prompt_len: int
    pixel_values: torch.Tensor | None  # [patches, 3 * temporal_patch * patch * patch]; None: no image
    image_grid_thw: torch.Tensor | None  # [images, 3] long

    @property
    def response_len(self) -> int:
        return int(self.input_ids.numel()) - self.prompt_len

    @property
    def image_tokens(self) -> int:
        """Tokens the images take in the sequence (what packing and micro-batching must count)."""
        if self.image_grid_thw is None:
            return 0
        return int(self.image_grid_thw.prod(-1).sum()) // 4  # 2x2 patches merged into one token


def checkpoint_name(name: str, model_type: str) -> str:
    """A parameter's name in its model folder: the learner's name, renamed for the families whose
    folders transformers 5 saves in their original layout (`CHECKPOINT_RENAMED`)."""
    if model_type in CHECKPOINT_RENAMED:
        for held, saved in _CHECKPOINT_PREFIXES:
            if name.startswith(held):
                return saved + name[len(held) :]
    return name


def is_vision_name(name: str) -> bool:
    """Whether a parameter (the learner's name or the folder's; a PEFT wrapper's prefix aside)
    belongs to the vision tower or its projector."""
    return name.removeprefix("base_model.model.").startswith(VISION_PREFIXES)


def is_vision_folder(path: str | Path) -> bool:
    """Whether a model folder's config.json describes a vision-language model (a `vision_config`):
    one that loads as `AutoModelForImageTextToText`."""
    config = json.loads((Path(path) / "config.json").read_text())
    return isinstance(config, dict) and "vision_config" in config


def pixel_settings(min_pixels: int | None, max_pixels: int | None) -> dict[str, int]:
    """The processor's image-size keywords for `data.min_pixels` / `data.max_pixels` (None: the
    folder's own setting, left out): what the engine passes as vLLM's `mm_processor_kwargs`, and
    the learner and the reference build their processor with, so an image becomes as many
    patches as the engine's prompt has image tokens."""
    return {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}


def load_processor(path: str | Path, min_pixels: int | None = None, max_pixels: int | None = None):
    """The model folder's processor (tokenizer, image and video processors), its images resized
    within [min_pixels, max_pixels] where set (`pixel_settings`), torchvision made importable."""
    ensure_torchvision_importable()
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(path), **pixel_settings(min_pixels, max_pixels))


def processor_prompt(processor, prompt_text: str, images: list[Any]) -> VisionSample:
    """A chat-templated prompt with its images (PIL images, in placeholder order) as model inputs."""
    out = processor(text=[prompt_text], images=images or None, return_tensors="pt")
    grid = out.get("image_grid_thw")
    return VisionSample(
        input_ids=out["input_ids"][0].long(),
        prompt_len=int(out["input_ids"].shape[1]),
        pixel_values=out.get("pixel_values"),
        image_grid_thw=None if grid is None else grid.long(),
    )


def vision_sample(processor, prompt_text: str, images: list[Any], response_ids: list[int]) -> VisionSample:
    """`processor_prompt` followed by a response's token ids."""
    prompt = processor_prompt(processor, prompt_text, images)
    prompt.input_ids = torch.cat([prompt.input_ids, torch.tensor(response_ids, dtype=torch.long)])
    return prompt


def token_types(input_ids: torch.Tensor, config) -> torch.Tensor:
    """`mm_token_type_ids`: IMAGE at image tokens, VIDEO at video tokens, 0 at text."""
    types = torch.zeros_like(input_ids, dtype=torch.int)
    types[input_ids == config.image_token_id] = IMAGE
    types[input_ids == getattr(config, "video_token_id", -1)] = VIDEO
    return types


def _rope_owner(model):
    """The module holding `get_rope_index` (Qwen's inner model), also under a DeepSpeed or PEFT wrapper."""
    inner = getattr(model, "module", model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return inner.model if hasattr(inner.model, "get_rope_index") else inner


def rope_positions(
    model, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The multimodal rotary position ids [3, B, L] of sequences `input_ids` [B, L], right-padded
    where `attention_mask` says so (padding gets position 0; an image's tokens share a time
    position and run over its rows and columns; text continues after the image's largest side).
    Index arithmetic only: it runs on the host copy of a batch as well as on the device."""
    owner = _rope_owner(model)
    positions, _ = owner.get_rope_index(
        input_ids,
        mm_token_type_ids=token_types(input_ids, owner.config),
        image_grid_thw=image_grid_thw,
        attention_mask=attention_mask,
    )
    return positions


def decoded(images: Sequence[bytes]) -> list[Any]:
    """A sequence's images (encoded bytes, `Rollout.images`) as RGB PIL images, as the engine decodes them."""
    from PIL import Image

    return [Image.open(io.BytesIO(data)).convert("RGB") for data in images]


def batch_vision_inputs(
    model, processor, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: Sequence[Sequence[bytes]]
) -> dict[str, torch.Tensor] | None:
    """The extra model inputs of right-padded rows `input_ids` [B, L] whose images (encoded, in
    placeholder order) are `images[b]`: every row's patches concatenated in row order
    (`pixel_values`), their grids (`image_grid_thw`) and the multimodal rotary `position_ids`
    [3, B, L]; None when no row has an image. Host tensors, made once per batch.

    The ids hold each image expanded to its tokens already (the engine's prompt ids): a row whose
    images come out of `processor` as another number of tokens is refused, since its patches
    would not fit its placeholders (the processor's min/max pixels differ from the engine's)."""
    if not any(images):
        return None
    config = _rope_owner(model).config
    merge = config.vision_config.spatial_merge_size
    pixels, grids = [], []
    for row, row_images in enumerate(images):
        held = int((input_ids[row] == config.image_token_id).sum())
        made = 0
        if row_images:
            out = processor.image_processor(images=decoded(row_images), return_tensors="pt")
            grids.append(out["image_grid_thw"].long())
            pixels.append(out["pixel_values"])
            made = int(grids[-1].prod(-1).sum()) // merge**2
        if made != held:
            raise ValueError(
                f"row {row}: its {len(row_images)} images make {made} image tokens, its sequence holds {held} "
                "(the processor's min/max pixels must be the engine's: data.min_pixels / data.max_pixels)"
            )
    grid = torch.cat(grids)
    positions = rope_positions(model, input_ids, grid, attention_mask)
    return {"pixel_values": torch.cat(pixels), "image_grid_thw": grid, "position_ids": positions}


def vision_response_logprobs(model, sample: VisionSample, temperature: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Per-token log-probs [T] of `sample`'s response under `model` given its images (logits
    divided by `temperature`, as the engine samples), with metrics (the image tokens seen).

    Gradients flow when called with them on (the learner's step); the parity test calls it under
    `torch.no_grad`."""
    device = next(model.parameters()).device
    ids = sample.input_ids[None].to(device)
    grid = None if sample.image_grid_thw is None else sample.image_grid_thw.to(device)
    pixels = None if sample.pixel_values is None else sample.pixel_values.to(device, model.dtype)
    out = model(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=pixels,
        image_grid_thw=grid,
        position_ids=rope_positions(model, ids, grid),
        use_cache=False,
    )
    start = sample.prompt_len - 1
    logits = out.logits[0, start : start + sample.response_len].float() / temperature
    targets = ids[0, sample.prompt_len :]
    logprobs = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    return logprobs, {"image_tokens": sample.image_tokens, "response_tokens": sample.response_len}


def load_vision_lm(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A vision-language model (`AutoModelForImageTextToText`) from a local folder, in eval mode."""
    ensure_torchvision_importable()
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype)
    return model.to(device).eval()  # type: ignore[arg-type]  # transformers types .to as an unbound wrapper
