"""A short supervised warm-up on the task (prompt -> answer + EOS, or a multi-turn demonstration),
so RL starts from a model that knows the answer format. Runs in-process on CPU in seconds for the
tiny model and is cached: the same base model, data and settings give the same folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch

from rlhf_cluster.data.prompts import Prompt, Segment

Example = TypeVar("Example")


def warmed_model_dir(
    base: str | Path,
    prompts: list[Prompt],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    demonstrations: list[list[Segment]] | None = None,
    kind: str = "",
) -> Path:
    """The cache folder for a warm-up: beside the base model, named by a hash of everything that
    matters (`kind`: another warm-up of the same prompts, e.g. a vision-language model's)."""
    fields = {
        "base": str(base),
        "data": [(p.text, p.answer) for p in prompts],
        "steps": steps,
        "lr": lr,
        "batch": batch_size,
        "seed": seed,
    }
    if demonstrations is not None:
        fields["demonstrations"] = demonstrations
    if kind:
        fields["kind"] = kind
    key = json.dumps(fields, sort_keys=True)
    return Path(base).parent / f"{Path(base).name}-sft-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def ensure_warmed_model(
    base: str | Path,
    prompts: list[Prompt],
    steps: int,
    lr: float = 3e-3,
    batch_size: int = 32,
    seed: int = 0,
    progress=None,
    demonstrations: list[list[Segment]] | None = None,
) -> Path:
    """Fine-tune `base` on (prompt, answer + EOS) pairs with the loss on answer tokens only; with
    `demonstrations` (one per prompt), on prompt + segments + EOS with the loss on the segments
    marked trained (a tool's observations are not), each segment tokenized apart as an episode does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = warmed_model_dir(base, prompts, steps, lr, batch_size, seed, demonstrations)
    if (target / "config.json").is_file():
        return target
    if demonstrations is None:
        require_answers(prompts)
    elif not prompts or len(demonstrations) != len(prompts):
        raise ValueError(
            f"the supervised warm-up needs one demonstration per prompt: {len(prompts)} prompts, "
            f"{len(demonstrations)} demonstrations"
        )
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).train()
    examples = _examples(tokenizer, prompts, demonstrations)
    train_steps(model.parameters(), examples, partial(_padded_loss, model), steps, lr, batch_size, seed, progress)
    save_once(model, tokenizer, target)
    return target


def require_answers(prompts: list[Prompt]) -> None:
    """Refuse a warm-up on prompts without reference answers (or on none)."""
    if not prompts or any(not p.answer for p in prompts):
        raise ValueError("the supervised warm-up needs prompts with reference answers")


def train_steps(
    parameters: Iterable[torch.nn.Parameter],
    examples: Sequence[Example],
    batch_loss: Callable[[list[Example]], torch.Tensor],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress=None,
) -> None:
    """`steps` AdamW steps on `parameters`, each on `batch_loss` of `batch_size` examples drawn with
    replacement in `seed`'s order; `progress(step, loss)` after each (a warm-up's training loop)."""
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    rng = random.Random(seed)
    for step in range(steps):
        loss = batch_loss([examples[rng.randrange(len(examples))] for _ in range(batch_size)])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if progress is not None:
            progress(step, loss.item())


def _padded_loss(model, batch: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """The causal LM's loss on (input ids, labels) examples padded to the batch's longest."""
    width = max(len(ids) for ids, _ in batch)
    # Masks come from lengths, not token ids: the pad id may equal a real token.
    input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in batch])
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
    batch_labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
    return model(input_ids=input_ids, attention_mask=attention, labels=batch_labels).loss


def _examples(
    tokenizer, prompts: list[Prompt], demonstrations: list[list[Segment]] | None
) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) of each prompt: the prompt + its answer (or its demonstration's
    segments) + EOS, labelled -100 where the loss does not reach (the prompt, untrained segments)."""
    eos = tokenizer.eos_token_id
    examples = []
    for i, p in enumerate(prompts):
        ids = p.encode(tokenizer)
        labels = [-100] * len(ids)
        if demonstrations is None:
            answer_ids = tokenizer(p.answer)["input_ids"]
            ids, labels = ids + answer_ids, labels + answer_ids
        else:
            for text, trained in demonstrations[i]:
                piece = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids, labels = ids + piece, labels + (piece if trained else [-100] * len(piece))
        examples.append((ids + [eos], labels + [eos]))
    return examples


def save_once(model, tokenizer, target: Path) -> None:
    """Write the model and tokenizer to `target` through a temporary folder renamed into place: a
    warm-up that another process finished first is kept (the same inputs give the same folder)."""
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
