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


def load_processor(path: str | Path):
    """The model folder's processor (tokenizer, image and video processors), torchvision made importable."""
    ensure_torchvision_importable()
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(path))


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


def rope_positions(model, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None) -> torch.Tensor:
    """The multimodal rotary position ids [3, B, L] of unpadded sequences `input_ids` [B, L]
    (an image's tokens share a time position and run over its rows and columns; text continues
    after the image's largest side)."""
    base = model.model if hasattr(model.model, "get_rope_index") else model
    positions, _ = base.get_rope_index(
        input_ids, mm_token_type_ids=token_types(input_ids, model.config), image_grid_thw=image_grid_thw
    )
    return positions


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
