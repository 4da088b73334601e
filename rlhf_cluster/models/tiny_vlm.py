"""The tiny random vision-language model (`model.tiny.architecture: qwen2_5_vl`), built locally.

A Qwen2.5-VL: a vision tower of `vision_layers` blocks (14-pixel patches, 2x2 merged into one
image token, so one token per 28x28 pixels) feeding the same small dense LM as the text tiny
models, with the BPE tokenizer of `tiny_model` plus Qwen's chat and vision special tokens, a chat
template that places an image's `<|vision_start|><|image_pad|><|vision_end|>` where the message
has it, and a `Qwen2_5_VLProcessor` (image processor, video processor, tokenizer) saved beside the
weights, so `AutoProcessor.from_pretrained` and vLLM both load the folder. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rlhf_cluster.config import TinyModelConfig
from rlhf_cluster.models.torchvision_ops import ensure_torchvision_importable

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_TOKENS = (IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
PATCH, MERGE, TEMPORAL_PATCH = 14, 2, 2
PIXELS_PER_TOKEN = (PATCH * MERGE) ** 2
# Weights drawn 5x wider than transformers' 0.02: at 0.02 the random model's next-token
# distribution is nearly uniform whatever the image, so a test could not tell the image (or its
# rotary positions) was used; at 0.1 a different image moves log-probs by ~0.1-1.
INIT_STD = 0.1
FP32: dict[str, Any] = {"torch_dtype": "float32"}

# Qwen2-VL's template, cut to what the tiny model needs: a message's content is a string, or a
# list of parts, each an image (`{"type": "image"}`, or an OpenAI `image_url` part), a video or
# text; each image becomes its placeholder, which the processor expands to the image's tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen2_5_vl_config(text: dict[str, Any], vision: dict[str, Any], ids: dict[str, int], **outer: Any):
    """A `Qwen2_5_VLConfig` of the language model's `text` and the vision tower's `vision` settings,
    with what every Qwen2.5-VL here shares added: the multimodal rotary sections (time, height,
    width) splitting head_dim / 2 frequencies, 14-pixel patches merged 2x2, and the vision tokens'
    ids `ids` (by token); `outer`: the config's own keywords (`tie_word_embeddings`, ...)."""
    from transformers import Qwen2_5_VLConfig

    half = text["hidden_size"] // text["num_attention_heads"] // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    return Qwen2_5_VLConfig(
        text_config={
            **text,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
        },
        vision_config={
            **vision,
            "patch_size": PATCH,
            "spatial_merge_size": MERGE,
            "temporal_patch_size": TEMPORAL_PATCH,
        },
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        **outer,
    )


def build_vlm(cfg: TinyModelConfig, tokenizer):
    """A random Qwen2.5-VL (fp32) over `tokenizer`, whose vision tokens are already in its vocabulary."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in VISION_TOKENS}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        initializer_range=INIT_STD,
    )
    vision = dict(
        depth=cfg.vision_layers,
        hidden_size=cfg.vision_hidden_size,
        intermediate_size=2 * cfg.vision_hidden_size,
        num_heads=cfg.vision_hidden_size // 32,
        out_hidden_size=cfg.hidden_size,
        window_size=2 * PATCH * MERGE,
        fullatt_block_indexes=[cfg.vision_layers - 1],
        initializer_range=INIT_STD,
    )
    # The legacy name on purpose: it sets the text config's dtype too (`dtype=` only the outer).
    config = qwen2_5_vl_config(text, vision, ids, tie_word_embeddings=False, **FP32)
    torch.manual_seed(cfg.seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    # Turns end with <|im_end|>: a generation stops there as at EOS.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, ids[IM_END]]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_processor(cfg: TinyModelConfig, tokenizer, out_dir: Path):
    """The `Qwen2_5_VLProcessor` of the tiny VLM (images resized to at most `image_max_pixels`), saved."""
    ensure_torchvision_importable()
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    pixels = dict(
        size={"shortest_edge": PIXELS_PER_TOKEN * 4, "longest_edge": cfg.image_max_pixels},
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=TEMPORAL_PATCH,
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    return processor


def write_tiny_vlm(cfg: TinyModelConfig, tokenizer, out_dir: Path) -> None:
    """Write the tiny VLM's weights, chat template and processor into `out_dir`, over `tokenizer`
    (trained with `VISION_TOKENS` among its special tokens)."""
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    model = build_vlm(cfg, tokenizer)
    model.save_pretrained(out_dir, safe_serialization=True)
    build_processor(cfg, tokenizer, out_dir)
