"""A vision-language policy on the learner's side: its processor, each pass's image inputs, the
frozen vision tower and the names its weights leave under.

A row of a step's batch holds its images expanded already (the engine's prompt ids: one
`<|image_pad|>` per image token) and carries the images themselves (`TrainBatch.images`). The
learner turns each micro-batch's images into the model's extra inputs once per step, when the
step's passes are planned (`plan_micro_batches`), on the host: pixel values, grids and the
multimodal rotary positions of the padded rows (`vision.batch_vision_inputs`). Such passes are
never packed; their token budget counts the padded rows, image tokens included.

`learner.freeze_vision` (default true) freezes the vision tower and its projector: no gradient,
not in the optimizer, and never sent to an engine (which keeps the folder's). Every name sent to an
engine is the folder's (`vision.checkpoint_name`: transformers 5 holds `model.visual.*` and
`model.language_model.*`, a Qwen2-VL folder and vLLM's loader `visual.*` and `model.*`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_cluster.experience.records import TrainBatch, pad_sequences
from rlhf_cluster.models.modeling import response_logprobs
from rlhf_cluster.models.packing import to_device
from rlhf_cluster.models.sequence_parallel import plain_attention
from rlhf_cluster.models.vision import (
    batch_vision_inputs,
    checkpoint_name,
    is_vision_folder,
    is_vision_name,
    load_processor,
)


class LearnerImages:
    """The processor of a vision-language policy, built with the data's `min_pixels` /
    `max_pixels` (the engine's `mm_processor_kwargs`), so an image becomes as many patches as its
    row's placeholders hold."""

    def __init__(self, model_path: str | Path, min_pixels: int | None = None, max_pixels: int | None = None):
        self.processor = load_processor(model_path, min_pixels, max_pixels)

    @classmethod
    def of_folder(
        cls, model_path: str | Path, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> LearnerImages | None:
        """The images' side of the model in `model_path`; None for a text-only model."""
        return cls(model_path, min_pixels, max_pixels) if is_vision_folder(model_path) else None

    def inputs(self, model, batch: TrainBatch, rows: list[int], device: torch.device) -> dict[str, torch.Tensor] | None:
        """The extra model inputs of rows `rows` of the host batch `batch` (in that order), on
        `device` by copies the host does not wait for; None where none of them has an image."""
        if batch.images is None:
            return None
        host = batch_vision_inputs(
            model,
            self.processor,
            batch.input_ids[rows],
            batch.attention_mask[rows],
            [batch.images[i] for i in rows],
        )
        return None if host is None else {name: to_device(t, device) for name, t in host.items()}

    def sequence_inputs(
        self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: list[tuple[bytes, ...]]
    ) -> dict[str, torch.Tensor] | None:
        """`inputs` of padded rows given apart from a batch (the mismatch probe's sequences), on their device."""
        host = batch_vision_inputs(model, self.processor, input_ids.cpu(), attention_mask.cpu(), images)
        return None if host is None else {name: t.to(input_ids.device) for name, t in host.items()}


def freeze_vision(model: torch.nn.Module) -> int:
    """Freeze the vision tower and projector of `model` (before it is sharded); returns how many
    parameters were frozen (0: a text-only model)."""
    frozen = 0
    for name, param in model.named_parameters():
        if is_vision_name(name):
            param.requires_grad_(False)
            frozen += 1
    return frozen


@dataclass(frozen=True)
class EngineNames:
    """Which learner tensors an engine receives, and under which names."""

    model_type: str
    freeze_vision: bool

    @classmethod
    def of(cls, model, freeze: bool) -> EngineNames:
        """For a Hugging Face `model` (also wrapped: FSDP2, DeepSpeed, PEFT) and `learner.freeze_vision`."""
        config = getattr(getattr(model, "module", model), "config", None)
        return cls(str(getattr(config, "model_type", "")), freeze)

    def sent(self, name: str) -> bool:
        """Whether the tensor `name` (the learner's) goes to the engines: all but a frozen vision tower's."""
        return not (self.freeze_vision and is_vision_name(name))

    def renamed(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """`tensors` under the model folder's names (what the engine's loader takes)."""
        for name, tensor in tensors:
            yield checkpoint_name(name, self.model_type), tensor


@torch.no_grad()
def probe_forward(
    model,
    device: torch.device,
    images: LearnerImages | None,
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    sequence_images: list[tuple[bytes, ...]] | None = None,
) -> list[list[float]]:
    """`LearnerBase.probe_logprobs`' forward: fp32 log-probs of fixed sequences at temperature 1,
    every rank the whole sequences; a vision-language policy's with each sequence's images."""
    input_ids, attention_mask, prompt_lengths, T = pad_sequences(prompt_ids, response_ids)
    ids, mask = input_ids.to(device), attention_mask.to(device)
    inputs = None
    if sequence_images and any(sequence_images):
        if images is None:
            raise ValueError("probe sequences with images for a text-only policy")
        inputs = images.sequence_inputs(model, ids, mask, sequence_images)
    model.eval()
    with plain_attention(model):  # every rank the whole sequences (sequence_parallel: its own attention)
        logp, _ = response_logprobs(model, ids, mask, prompt_lengths.to(device), T, inputs=inputs)
    model.train()
    logp = logp.float().cpu()
    return [logp[i, : len(r)].tolist() for i, r in enumerate(response_ids)]
