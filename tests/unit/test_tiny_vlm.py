"""The tiny vision-language model: built locally and cached, loadable by `AutoProcessor` with its
vision tokens and chat template, and the learner's forward (`models.vision`) takes its images."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from rlhf_cluster.config import TinyModelConfig
from rlhf_cluster.models.tiny_model import ensure_tiny_model, tiny_model_dir
from rlhf_cluster.models.tiny_vlm import (
    IMAGE_PAD,
    VISION_END,
    VISION_START,
    VISION_TOKENS,
    qwen2_5_vl_config,
)
from rlhf_cluster.models.vision import (
    checkpoint_name,
    load_processor,
    load_vision_lm,
    rope_positions,
    vision_response_logprobs,
    vision_sample,
)

CFG = TinyModelConfig(architecture="qwen2_5_vl")


@pytest.fixture(scope="module")
def vlm(model_cache):
    path = ensure_tiny_model(CFG, model_cache)
    return path, load_processor(path), load_vision_lm(path)


def _chat(processor, images: int, text: str = "3+4=") -> str:
    content = [{"type": "image"}] * images + [{"type": "text", "text": text}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def test_folder_holds_a_qwen2_5_vl_and_its_processor(vlm, model_cache):
    path, processor, model = vlm
    assert ensure_tiny_model(CFG, model_cache) == path == tiny_model_dir(CFG, model_cache)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and config["vision_config"]["depth"] == CFG.vision_layers
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert type(processor.video_processor).__name__.startswith("Qwen2VLVideoProcessor")
    ids = [processor.tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    assert len(set(ids)) == len(VISION_TOKENS) and max(ids) < model.config.text_config.vocab_size
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    head_dim = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    assert head_dim >= 32


def test_text_models_keep_their_cache_names(tmp_path):
    dense = TinyModelConfig()
    assert tiny_model_dir(dense, tmp_path) == tiny_model_dir(dense.model_copy(update={"vision_layers": 5}), tmp_path)
    assert tiny_model_dir(CFG, tmp_path) != tiny_model_dir(CFG.model_copy(update={"vision_layers": 3}), tmp_path)


def test_a_qwen2_5_vl_config_gets_the_shared_patches_rotary_sections_and_token_ids():
    """What the tiny VLM and benchmarks/gpu/vlm_learner.py's 3B shape share (`qwen2_5_vl_config`)."""
    ids = {t: 10 + i for i, t in enumerate(VISION_TOKENS)}
    text = {"hidden_size": 256, "num_attention_heads": 2, "num_hidden_layers": 1, "vocab_size": 64}
    config = qwen2_5_vl_config(text, {"depth": 1, "hidden_size": 64}, ids, tie_word_embeddings=True)
    assert config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]  # head_dim 128, as 3B's
    assert (config.vision_config.patch_size, config.vision_config.spatial_merge_size) == (14, 2)
    assert config.image_token_id == ids[IMAGE_PAD] and config.vision_end_token_id == ids[VISION_END]
    assert config.tie_word_embeddings and config.text_config.hidden_size == 256


def test_vision_hidden_size_is_whole_heads():
    with pytest.raises(ValueError, match="multiple of 32"):
        TinyModelConfig(architecture="qwen2_5_vl", vision_hidden_size=48)


def test_template_places_each_image_and_the_processor_expands_it(vlm):
    _, processor, _ = vlm
    text = _chat(processor, 2)
    assert text.count(f"{VISION_START}{IMAGE_PAD}{VISION_END}") == 2
    assert text.endswith("<|im_start|>assistant\n")
    big, small = Image.new("RGB", (300, 200), "red"), Image.new("RGB", (56, 56), "blue")
    sample = vision_sample(processor, text, [big, small], [100, 101, 102])
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    # 56x56 is 4x4 patches, 4 tokens of 28x28 pixels; 300x200 is resized to at most image_max_pixels.
    assert sample.image_grid_thw[1].tolist() == [1, 4, 4]
    assert int(sample.image_grid_thw[0].prod()) * 14 * 14 <= CFG.image_max_pixels
    assert int((sample.input_ids == image_id).sum()) == sample.image_tokens
    assert sample.pixel_values.shape[0] == int(sample.image_grid_thw.prod(-1).sum())
    assert sample.response_len == 3 and sample.input_ids[-3:].tolist() == [100, 101, 102]


def test_rotary_positions_run_over_the_image_grid(vlm):
    _, processor, model = vlm
    sample = vision_sample(processor, _chat(processor, 1), [Image.new("RGB", (112, 56), "red")], [100])
    positions = rope_positions(model, sample.input_ids[None], sample.image_grid_thw)[:, 0]
    image = sample.input_ids == model.config.image_token_id
    t, h, w = positions[:, image]
    assert set(t.tolist()) == {t[0].item()}  # one time step
    assert len(set(h.tolist())) == 2 and len(set(w.tolist())) == 4  # a 2x4 grid of image tokens
    after = positions[:, ~image][:, -1]
    assert (after == after[0]).all() and after[0] < sample.input_ids.numel() - 1  # text resumes past the grid


def test_logprobs_take_the_image_and_the_temperature_and_carry_gradients(vlm):
    _, processor, model = vlm
    text, response = _chat(processor, 1), [100, 101, 102, 103]
    red = vision_sample(processor, text, [Image.new("RGB", (56, 56), "red")], response)
    blue = vision_sample(processor, text, [Image.new("RGB", (56, 56), "blue")], response)
    logp, metrics = vision_response_logprobs(model, red)
    assert logp.shape == (4,) and (logp < 0).all() and metrics == {"image_tokens": 4, "response_tokens": 4}
    logp.sum().backward()
    visual_grads = [p.grad for n, p in model.named_parameters() if "visual" in n and p.grad is not None]
    assert visual_grads and any(g.abs().sum() > 0 for g in visual_grads)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        other, _ = vision_response_logprobs(model, blue)
        hot, _ = vision_response_logprobs(model, red, temperature=2.0)
    assert (other - logp.detach()).abs().max() > 1e-2
    assert (hot - logp.detach()).abs().max() > 1e-2


def test_checkpoint_names_are_the_folders(vlm):
    from safetensors import safe_open

    path, _, model = vlm
    with safe_open(str(path / "model.safetensors"), "pt") as folder:
        saved = set(folder.keys())
    renamed = {checkpoint_name(name, model.config.model_type) for name in model.state_dict()}
    assert renamed == saved and any(n.startswith("visual.") for n in saved)
    assert checkpoint_name("model.layers.0.mlp.up_proj.weight", "qwen2") == "model.layers.0.mlp.up_proj.weight"
