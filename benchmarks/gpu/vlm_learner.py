"""One learner step of a vision-language policy at Qwen2.5-VL-3B's shape (issue 71), timed.

A random Qwen2.5-VL of the published Qwen2.5-VL-3B-Instruct config.json's dimensions
(`VLM_SHAPES`) is built locally as a model folder with its processor: the tiny VLM's tokenizer,
chat template and `Qwen2_5_VLProcessor` (`rlhf_cluster/models/tiny_vlm.py`), nothing downloaded;
its weights drawn on the GPU where there is one and saved in bf16. The batch: `--rows` rows, each one
`--image-side` x `--image-side` image of random pixels (448: 32x32 patches of 14 pixels, merged 2x2
into 256 image tokens), a question and a response of `--response` random text tokens.
Our learner (`sides.Ours`: FSDP2 on one rank, bf16 mixed precision on CUDA, `learner.freeze_vision`
as configured by default: true; on CUDA the memory plan given 85% of the GPU, `--memory-fraction`)
takes `--warmup` steps, then `--reps` timed ones (medians).

Figures: seconds per step, real tokens/s (image tokens included: the language model runs them),
peak GPU memory, and MFU as `rlhf_cluster.models.flops` counts a decoder: `mfu` 6 x the language
model's parameters (embedding included, tied: once) x real tokens, `mfu_with_attention` plus its
attention term; `mfu_with_vision` adds the vision tower's dense count (2 x its parameters x patches,
the projector's MLP at the merged tokens; x3 with `--train-vision`), no attention term for it.

    python3 -m benchmarks.gpu.vlm_learner                      # CUDA: qwen2.5-vl-3b, 8 rows of 448x448
    .venv/bin/python -m benchmarks.gpu.vlm_learner --shape vlm-smoke --rows 2 --reps 1 --warmup 0   # CPU
"""

from __future__ import annotations

import argparse
import io
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.common import headline, machine_info, print_table, result_path, write_result
from benchmarks.gpu.learner import add_side_option
from benchmarks.gpu.models import SMOKE_VOCAB, VOCAB, device_and_peak, join_one_rank_group
from benchmarks.gpu.sides import Ours, time_side

# Qwen2.5-VL-3B-Instruct's config.json (transformers' Qwen2_5_VLConfig defaults are the 7B/72B
# ones): language model hidden 2048, 36 layers, 16 query heads of 128 and 2 KV heads, MLP 11008,
# vocabulary 151,936, tied embeddings, rotary sections [16, 24, 24], RMS eps 1e-6; vision tower 32
# blocks of width 1280 (16 heads, MLP 3420, SiLU), 14-pixel patches merged 2x2, windows of 112
# pixels, full attention in blocks 7, 15, 23 and 31, projected to 2048. `vlm-smoke`: the same
# kind at the tiny VLM's size and the smoke vocabulary, for the CPU.
_TEXT = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")
_VISION = ("depth", "hidden_size", "intermediate_size", "num_heads", "fullatt_block_indexes")
_ROWS: dict[str, tuple[tuple, tuple, int, int]] = {
    "qwen2.5-vl-3b": ((2048, 36, 16, 2, 11008), (32, 1280, 3420, 16, [7, 15, 23, 31]), VOCAB, 448),
    "vlm-smoke": ((64, 2, 2, 1, 128), (2, 64, 128, 2, [1]), SMOKE_VOCAB, 56),
}
VLM_SHAPES: dict[str, dict[str, Any]] = {
    name: {"text": dict(zip(_TEXT, text)), "vision": dict(zip(_VISION, vision)), "vocab": vocab, "image_side": side}
    for name, (text, vision, vocab, side) in _ROWS.items()
}
QUESTION = "What colour is the dot in the image? Answer in one word."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(VLM_SHAPES), default="qwen2.5-vl-3b" if cuda else "vlm-smoke")
    p.add_argument("--rows", type=int, default=8 if cuda else 2, help="rows per step, one image each")
    p.add_argument("--image-side", type=int, default=None, help="pixels per image side (default: the shape's)")
    p.add_argument(
        "--response", type=int, nargs=2, default=[128, 384] if cuda else [4, 8], help="response lengths (seeded)"
    )
    p.add_argument("--train-vision", action="store_true", help="learner.freeze_vision: false (default: frozen)")
    p.add_argument(
        "--memory-fraction",
        type=float,
        default=0.85 if cuda else None,
        help="CUDA: learner.memory_fraction, the share of the GPU the memory plan fills (its default 0.5 leaves "
        "half to colocated engines; the plan counts the language model alone, the tower's weights fit the rest)",
    )
    add_side_option(p, "ckpt:gradient_checkpointing=true")
    p.add_argument("--reps", type=int, default=3 if cuda else 1)
    p.add_argument("--warmup", type=int, default=1 if cuda else 0)
    p.add_argument("--cache-dir", default="~/.cache/rlhf_cluster/models")
    p.add_argument("--out", type=Path, default=result_path("gpu_vlm_learner"))
    return p.parse_args(argv)


def vlm_config(shape: str, ids: dict[str, int], eos: int, pad: int):
    """The `Qwen2_5_VLConfig` of `VLM_SHAPES[shape]`, its special tokens' ids `ids` (by token); the
    tiny VLM's patches and rotary sections (3B's: [16, 24, 24])."""
    from rlhf_cluster.models.tiny_vlm import qwen2_5_vl_config

    s = VLM_SHAPES[shape]
    text = dict(
        **s["text"],
        vocab_size=s["vocab"],
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=eos,
        tie_word_embeddings=True,
    )
    vision = dict(
        **s["vision"],
        out_hidden_size=s["text"]["hidden_size"],
        hidden_act="silu",
        window_size=112,
        tokens_per_second=2,
    )
    return qwen2_5_vl_config(text, vision, ids, tie_word_embeddings=True)


def build_vlm_folder(shape: str, cache_dir: str) -> Path:
    """A random Qwen2.5-VL of `VLM_SHAPES[shape]` saved once (bf16) as a model folder with the tiny
    VLM's tokenizer, chat template and a processor keeping images up to the shape's image side."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from rlhf_cluster.config import TinyModelConfig
    from rlhf_cluster.models.tiny_model import build_tokenizer
    from rlhf_cluster.models.tiny_vlm import CHAT_TEMPLATE, VISION_TOKENS, build_processor

    s = VLM_SHAPES[shape]
    folder = Path(cache_dir).expanduser() / f"random-{shape}-v{s['vocab']}"
    if (folder / "config.json").is_file():
        return folder
    scratch = folder.with_name(folder.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    tokenizer = build_tokenizer(512, scratch, "visual", VISION_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(scratch)
    side = s["image_side"]  # the processor first: it needs torchvision, and fails in seconds without it
    build_processor(TinyModelConfig(architecture="qwen2_5_vl", image_max_pixels=side * side), tokenizer, scratch)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in VISION_TOKENS}
    config = vlm_config(shape, ids, tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2_5_VLForConditionalGeneration(config).bfloat16()
    model.save_pretrained(scratch)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    scratch.rename(folder)
    return folder


def parameter_split(config) -> dict[str, int]:
    """Parameters of the model `config` describes (built on the meta device), by part: the language
    model (a tied embedding once), the vision tower, and its projector's MLP (`visual.merger.mlp`:
    run once per merged token, not per patch)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from rlhf_cluster.models.vision import is_vision_name

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    split = {"language": 0, "vision": 0, "projector_mlp": 0}
    for name, p in model.named_parameters():
        split["language" if not is_vision_name(name) else "vision"] += p.numel()
        split["projector_mlp"] += p.numel() if ".merger.mlp." in name else 0
    return split


def vlm_batch(folder: Path, args: argparse.Namespace, side: int):
    """`--rows` scored rows, each one random-pixel PNG of `side` pixels a side with the question
    (chat-templated, its image expanded by the processor as the engine's prompt ids hold it) and a
    response of random text tokens (never a special or vision token), with random advantages."""
    from PIL import Image

    from rlhf_cluster.experience.records import ScoredSample, TrainBatch
    from rlhf_cluster.models.tiny_vlm import VISION_TOKENS
    from rlhf_cluster.models.vision import load_processor, processor_prompt

    processor = load_processor(folder)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    rng = random.Random(0)
    first_text_id = 2 + len(VISION_TOKENS)  # after pad, EOS and the vision tokens
    samples = []
    for i in range(args.rows):
        image = Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
        png = io.BytesIO()
        image.save(png, format="PNG")
        prompt = processor_prompt(processor, text, [image]).input_ids.tolist()
        n = rng.randint(*args.response)
        samples.append(
            ScoredSample(
                sample_id=f"s{i}",
                prompt_id=f"p{i}",
                group_id=f"g{i // 4}",
                prompt_ids=prompt,
                response_ids=[rng.randrange(first_text_id, len(processor.tokenizer)) for _ in range(n)],
                rollout_logprobs=[-6.0] * n,
                policy_version=0,
                finish_reason="stop",
                reward=0.0,
                reward_components={},
                ref_logprobs=[-6.0] * n,
                advantages=[rng.uniform(-1, 1)] * n,
                images=(png.getvalue(),),
            )
        )
    return TrainBatch.from_samples(samples, pad_id=processor.tokenizer.pad_token_id)


def measure(args: argparse.Namespace) -> dict:
    """Build the folder and the batch, time each side (a one-rank process group already joined)."""
    from transformers import AutoConfig

    begun = time.perf_counter()
    folder = build_vlm_folder(args.shape, args.cache_dir)
    built = time.perf_counter() - begun
    config = AutoConfig.from_pretrained(folder)
    side = args.image_side or VLM_SHAPES[args.shape]["image_side"]
    batch = vlm_batch(folder, args, side)
    precision = "bf16" if torch.cuda.is_available() else "none"
    trainable: dict[str, int] = {}

    def build(name: str, **settings):
        def make() -> Ours:
            budget = {} if args.memory_fraction is None else {"memory_fraction": args.memory_fraction}
            made = Ours(folder, precision, freeze_vision=not args.train_vision, **{**budget, **settings})
            trainable[name] = sum(p.numel() for p in made.learner.model.parameters() if p.requires_grad)
            return made

        return make

    sides = {"ours": build("ours"), **{f"ours, {n}": build(f"ours, {n}", **s) for n, s in args.side}}
    results = {name: time_side(args, name, make, {"default": batch}) for name, make in sides.items()}
    split = parameter_split(config)
    device, peak = device_and_peak()
    figures = vlm_figures(results, batch, config, split, peak, args.train_vision)
    for name, row in figures.items():
        row["trainable_parameters"] = trainable.get(name.split(" [")[0])
    return {
        "benchmark": "gpu_vlm_learner",
        "machine": machine_info(),
        "config": {
            **{k: v for k, v in vars(args).items() if k != "out"},
            "image_side": side,
            "model": VLM_SHAPES[args.shape],
            "parameters": sum(split[k] for k in ("language", "vision")),
            "language_parameters": split["language"],
            "vision_parameters": split["vision"],
            "image_tokens": int((batch.input_ids == config.image_token_id).sum()),
            "real_tokens": int(batch.attention_mask.sum()),
            "device": device,
            "precision": precision,
            "bf16_peak_flops": peak,
            "build_seconds": built,
            "seconds": time.perf_counter() - begun,
        },
        "figures": figures,
    }


def vlm_figures(results: dict, batch, config, split: dict[str, int], peak: float | None, trained: bool) -> dict:
    """One row per side: seconds per step (median), real tokens/s, peak memory, MFU three ways
    (the module's docstring), the image and response tokens it ran."""
    from rlhf_cluster.models.flops import FlopsShape, batch_flops

    lengths = batch.attention_mask.sum(1).tolist()
    image_tokens = int((batch.input_ids == config.image_token_id).sum())
    patches = image_tokens * config.vision_config.spatial_merge_size**2
    tower = split["vision"] - split["projector_mlp"]
    vision_flops = 2 * (3 if trained else 1) * (tower * patches + split["projector_mlp"] * image_tokens)
    lm = batch_flops(FlopsShape.of_config(config, split["language"]), lengths)
    figures: dict[str, dict] = {}
    for name, got in results.items():
        got = got["default"]
        row: dict = {
            "side": name,
            "rows": len(lengths),
            "real_tokens": sum(lengths),
            "image_tokens": image_tokens,
            "response_tokens": int(batch.response_mask.sum()),
            "vision_forward_flops": vision_flops,
        }
        if "error" in got:
            row["error"] = got["error"]
        else:
            sec = statistics.median(got["timings"])
            row.update(
                timings=got["timings"],
                seconds_per_step=sec,
                real_tokens_per_s=sum(lengths) / sec,
                mfu=lm.dense / sec / peak if peak else None,
                mfu_with_attention=lm.with_attention / sec / peak if peak else None,
                mfu_with_vision=(lm.dense + vision_flops) / sec / peak if peak else None,
                peak_memory_gib=got["peak_bytes"] / 2**30 if got["peak_bytes"] else None,
                plan=got["plan"],
            )
        figures[f"{name} [default]"] = row
    return figures


def print_report(result: dict) -> None:
    cfg = result["config"]
    print(
        f"\ngpu_vlm_learner  {cfg['device']} | {cfg['shape']}: language {cfg['language_parameters'] / 1e6:.1f}M + "
        f"vision {cfg['vision_parameters'] / 1e6:.1f}M params | {cfg['rows']} rows, one {cfg['image_side']}px image "
        f"each: {cfg['image_tokens']} image tokens of {cfg['real_tokens']} | {cfg['precision']} | "
        f"vision {'trained' if cfg['train_vision'] else 'frozen'} | built in {cfg['build_seconds']:.0f} s"
    )
    rows = [
        [n, f.get("seconds_per_step"), f.get("real_tokens_per_s"), f.get("mfu"), f.get("mfu_with_attention")]
        + [f.get("mfu_with_vision"), f.get("peak_memory_gib"), (f.get("plan") or {}).get("checkpointing")]
        + [f.get("error", "")[:40]]
        for n, f in result["figures"].items()
    ]
    print_table(
        ["side", "s/step", "real tok/s", "MFU (LM)", "+attn", "+vision", "peak GiB", "ckpt", "error"],
        rows,
        ["{}", "{:.3f}", "{:.0f}", "{:.1%}", "{:.1%}", "{:.1%}", "{:.1f}", "{}", "{}"],
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    join_one_rank_group()
    try:
        result = measure(args)
    finally:
        dist.destroy_process_group()
    ours = result["figures"]["ours [default]"]
    result["headline"] = headline(
        "seconds per VLM learner step (ours)", ours.get("seconds_per_step"), "report", None, "s"
    )
    print_report(result)
    write_result(args.out, result)
    return 0 if "error" not in ours else 1


if __name__ == "__main__":
    sys.exit(main())
