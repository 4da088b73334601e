"""The supervised warm-up of a vision-language policy: the answer's form, not the images.

A visual task's answers are a word or a number the tiny random model never writes, so RL starts,
as for text, from a short supervised warm-up (`job/warmup.py`). Trained on each prompt's own
image, the warm-up itself would teach reading the images, and the RL run after it could not show
that it learned to: here each prompt is shown another prompt's image (the images placebo's
permutation, `data/placebo.py`, drawn with a seed of its own), so the warmed model knows the
answers' form and how often each comes, and nothing of what an image says about its answer.
What an RL run learns beyond that is reading the images, which its placebo (the same warm-up,
images shuffled during RL too) cannot (docs/demo-results.md).

The forward is the learner's (`models/vision.py`): the processor's ids, pixel values and grids,
the multimodal rotary positions, the loss on the answer and EOS tokens.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from rlhf_cluster.data.placebo import shuffled_images
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.generation.multimodal import decoded_images
from rlhf_cluster.job.warmup import save_once, warmed_model_dir
from rlhf_cluster.models.vision import (
    VisionSample,
    load_processor,
    load_vision_lm,
    vision_response_logprobs,
    vision_sample,
)

WARMUP_PERMUTATION_SEED = 7_919  # the warm-up's images permutation: one for every seed of a demo


def ensure_warmed_vision_model(
    base: str | Path,
    prompts: list[Prompt],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    pixels: tuple[int | None, int | None] = (None, None),
    progress=None,
) -> Path:
    """`base` fine-tuned on (prompt with another prompt's images, answer + EOS), loss on the answer;
    images resized within `pixels` (min, max: the engines' setting). Cached as `warmed_model_dir`
    (the images do not enter its key: they are a fixed permutation of the prompts')."""
    target = warmed_model_dir(base, prompts, steps, lr, batch_size, seed)
    if (target / "config.json").is_file():
        return target
    if not prompts or any(not p.answer for p in prompts):
        raise ValueError("the supervised warm-up needs prompts with reference answers")
    processor = load_processor(base, *pixels)
    torch.manual_seed(seed)
    model = load_vision_lm(base).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    shown, _ = shuffled_images(prompts, WARMUP_PERMUTATION_SEED)
    examples = [_example(processor, p) for p in shown]
    rng = random.Random(seed)
    for step in range(steps):
        batch = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
        tokens = sum(sample.response_len for sample in batch)
        loss = -torch.stack([vision_response_logprobs(model, sample)[0].sum() for sample in batch]).sum() / tokens
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if progress is not None:
            progress(step, loss.item())
    save_once(model.eval(), processor, target)
    return target


def _example(processor, prompt: Prompt) -> VisionSample:
    """One prompt (its chat-templated text) with its images, followed by its answer and EOS."""
    tokenizer = processor.tokenizer
    answer = tokenizer(prompt.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return vision_sample(processor, prompt.text, decoded_images(prompt.images), answer)
