"""The warm-up of a vision-language policy: it trains the tiny VLM on the answers' form with each
prompt shown another prompt's image (so it cannot learn to read them), loss going down, and is
cached as a folder that loads as the same kind of model."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_cluster.config import TinyModelConfig
from rlhf_cluster.data.prompts import Prompt, apply_chat_template
from rlhf_cluster.data.visual_task import visual_rows
from rlhf_cluster.job import vision_warmup
from rlhf_cluster.models.tiny_model import ensure_tiny_model
from rlhf_cluster.models.vision import load_processor


def test_the_warm_up_learns_the_answers_form_on_shuffled_images_and_is_cached(model_cache, monkeypatch):
    base = ensure_tiny_model(TinyModelConfig(architecture="qwen2_5_vl", corpus="visual"), model_cache)
    processor = load_processor(base)
    rows = visual_rows("visual_color", 12, seed=0)
    prompts = [Prompt(r["prompt_id"], r["prompt"], r["answer"], images=tuple(r["images"])) for r in rows]
    prompts = apply_chat_template(prompts, processor.tokenizer)
    shown: list[Prompt] = []
    real_example = vision_warmup._example
    monkeypatch.setattr(vision_warmup, "_example", lambda proc, p: shown.append(p) or real_example(proc, p))
    losses: list[float] = []
    target = vision_warmup.ensure_warmed_vision_model(
        base, prompts, steps=12, lr=3e-3, batch_size=4, seed=0, progress=lambda step, loss: losses.append(loss)
    )
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])  # the answers' form is learned
    assert [p.answer for p in shown] == [p.answer for p in prompts]  # each prompt keeps its answer...
    moved = sum(s.images != p.images for s, p in zip(shown, prompts))
    assert moved >= len(prompts) // 2  # ...and is shown another prompt's image
    assert json.loads((Path(target) / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    again = vision_warmup.ensure_warmed_vision_model(base, prompts, steps=12, lr=3e-3, batch_size=4, seed=0)
    assert again == target and len(shown) == len(prompts)  # cached: nothing trained the second time
