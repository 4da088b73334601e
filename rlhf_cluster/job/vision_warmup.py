"""The supervised warm-up of a vision-language policy: the answer's form, not the images.

A visual task's answers are a word or a number the tiny random model never writes, so RL starts,
as for text, from a short supervised warm-up (`job/warmup.py`). Trained on each prompt's own
image, the warm-up itself would teach reading the images, and the RL run after it could not show
that it learned to. Trained on another prompt's image (the placebo's permutation), it teaches
ignoring them: measured on the tiny VLM, after 20 or 60 such steps every image gave the same
answer distribution to three decimals, and RL from there collapsed onto one answer (entropy 0.003)
without ever reading one. So the warm-up is the prompts' text alone, each image placeholder taken
out: the warmed model knows the answers' form and how often each comes, and meets the images, with
its vision tower as the folder has it, in RL. What an RL run learns beyond the warm-up is reading
them, which its placebo (`data.placebo_images`: images shuffled across prompts) cannot
(docs/demo-results.md).

The forward is the learner's (`models/vision.py`): the processor's ids, the multimodal rotary
positions, the loss on the answer and EOS tokens.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.generation.image_turns import image_placeholder
from rlhf_cluster.job.warmup import require_answers, save_once, train_steps, warmed_model_dir
from rlhf_cluster.models.vision import (
    VisionSample,
    load_processor,
    load_vision_lm,
    vision_response_logprobs,
    vision_sample,
)
from rlhf_cluster.scoring.judge import without_images


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
    """`base` fine-tuned on (prompt's text without its images, answer + EOS), loss on the answer
    (`pixels`: the processor's min and max, the engines' setting). Cached as `warmed_model_dir`
    (the images do not enter its key: they are not shown)."""
    target = warmed_model_dir(base, prompts, steps, lr, batch_size, seed, kind="vision, text only")
    if (target / "config.json").is_file():
        return target
    require_answers(prompts)
    processor = load_processor(base, *pixels)
    torch.manual_seed(seed)
    model = load_vision_lm(base).train()
    examples = [_example(processor, p) for p in prompts]
    trained = [p for p in model.parameters() if p.requires_grad]
    train_steps(trained, examples, partial(_answer_loss, model), steps, lr, batch_size, seed, progress)
    save_once(model.eval(), processor, target)
    return target


def _answer_loss(model, batch: list[VisionSample]) -> torch.Tensor:
    """Mean negative log-probability of the batch's answer (and EOS) tokens."""
    tokens = sum(sample.response_len for sample in batch)
    return -torch.stack([vision_response_logprobs(model, sample)[0].sum() for sample in batch]).sum() / tokens


def _example(processor, prompt: Prompt) -> VisionSample:
    """One prompt's text, its image placeholders taken out, followed by its answer and EOS."""
    tokenizer = processor.tokenizer
    answer = tokenizer(prompt.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    text = without_images(prompt.text, [image_placeholder(tokenizer)])
    return vision_sample(processor, text, [], answer)
