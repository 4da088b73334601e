"""The warm-up of a vision-language policy: it trains the tiny VLM on the answers' form from the
prompts' text alone (no image shown, each placeholder taken out, so it can neither learn to read
nor to ignore them), loss going down, and is cached as a folder that loads as the same kind of
model, apart from a text warm-up of the same prompts."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_cluster.config import TinyModelConfig
from rlhf_cluster.data.chat_template import apply_chat_template
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.data.visual_task import visual_rows
from rlhf_cluster.job import vision_warmup
from rlhf_cluster.job.warmup import warmed_model_dir
from rlhf_cluster.models.tiny_model import ensure_tiny_model
from rlhf_cluster.models.vision import load_processor


def test_the_warm_up_learns_the_answers_form_from_the_text_alone_and_is_cached(model_cache, monkeypatch):
    base = ensure_tiny_model(TinyModelConfig(architecture="qwen2_5_vl", corpus="visual"), model_cache)
    processor = load_processor(base)
    rows = visual_rows("visual_color", 12, seed=0)
    prompts = [Prompt(r["prompt_id"], r["prompt"], r["answer"], images=tuple(r["images"])) for r in rows]
    prompts = apply_chat_template(prompts, processor.tokenizer)
    examples: list = []
    real_example = vision_warmup._example
    monkeypatch.setattr(
        vision_warmup, "_example", lambda proc, p: examples.append(real_example(proc, p)) or examples[-1]
    )
    losses: list[float] = []
    target = vision_warmup.ensure_warmed_vision_model(
        base, prompts, steps=12, lr=3e-3, batch_size=4, seed=0, progress=lambda step, loss: losses.append(loss)
    )
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])  # the answers' form is learned
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert all(p.images for p in prompts) and pad in prompts[0].token_ids  # the prompts have their images...
    assert all(e.pixel_values is None and pad not in e.input_ids.tolist() for e in examples)  # ...never shown
    answer = processor.tokenizer(prompts[0].answer, add_special_tokens=False)["input_ids"]
    assert examples[0].input_ids[examples[0].prompt_len :].tolist()[: len(answer)] == answer
    assert json.loads((Path(target) / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    assert target != warmed_model_dir(base, prompts, 12, 3e-3, 4, 0)  # not a text model's warm-up of them
    again = vision_warmup.ensure_warmed_vision_model(base, prompts, steps=12, lr=3e-3, batch_size=4, seed=0)
    assert again == target and len(examples) == len(prompts)  # cached: nothing trained the second time
