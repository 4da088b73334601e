"""A short supervised warm-up on the task (prompt -> answer + EOS), so RL starts from a model that
knows the answer format. Runs in-process on CPU in seconds for the tiny model and is cached: the
same base model, data and settings give the same folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

from rlhf_cluster.data.prompts import Prompt


def warmed_model_dir(base: str | Path, prompts: list[Prompt], steps: int, lr: float, batch_size: int, seed: int) -> Path:
    """The cache folder for a warm-up: beside the base model, named by a hash of everything that matters."""
    key = json.dumps(
        {"base": str(base), "data": [(p.text, p.answer) for p in prompts], "steps": steps, "lr": lr,
         "batch": batch_size, "seed": seed},
        sort_keys=True,
    )
    return Path(base).parent / f"{Path(base).name}-sft-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def ensure_warmed_model(
    base: str | Path, prompts: list[Prompt], steps: int, lr: float = 3e-3, batch_size: int = 32, seed: int = 0,
    progress=None,
) -> Path:
    """Fine-tune `base` on (prompt, answer + EOS) pairs with the loss on answer tokens only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = warmed_model_dir(base, prompts, steps, lr, batch_size, seed)
    if (target / "config.json").is_file():
        return target
    if not prompts or any(not p.answer for p in prompts):
        raise ValueError("the supervised warm-up needs prompts with reference answers")
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    eos = tokenizer.eos_token_id
    examples = []
    for p in prompts:
        prompt_ids = p.encode(tokenizer)
        answer_ids = tokenizer(p.answer)["input_ids"] + [eos]
        examples.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    rng = random.Random(seed)
    model.train()
    for step in range(steps):
        batch = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
        width = max(len(ids) for ids, _ in batch)
        # Masks come from lengths, not token ids: the pad id may equal a real token.
        input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in batch])
        attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if progress is not None:
            progress(step, float(loss))
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target
