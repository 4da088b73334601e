"""The GPU checks' models and batches: random-weight Qwen2 models of published shapes and Qwen3-MoE
models of scaled ones (built once into the model cache with the tiny tokenizer), RL-shaped batches
of random tokens, and the device: a one-rank process group on it and its dense bf16 peak."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.common import free_port, random_model, random_sample

# Dense bf16 peak FLOP/s by device name (vendor datasheets; sparse figures halved).
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}
VOCAB = 151936
# `smoke`'s vocabulary: `make gpu-check`'s CPU run (in `make test`) times nothing, and at 151,936 the
# output layer was most of each of its steps.
SMOKE_VOCAB = 8192


# Published shapes (Qwen2.5 model cards' config.json); `tiny` is the CPU shape, `smoke` the
# same at a small vocabulary for `make gpu-check` on the CPU. One row per
# shape, its columns the config.json fields `_FIELDS` names.
_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "tie_word_embeddings",
)
_ROWS: dict[str, tuple[int, int, int, int, int, bool | None]] = {
    # The CPU demo's model (configs/demo.yaml: hidden 64, 2 layers), its own small vocabulary; None:
    # tied as the tiny model builder ties it.
    "demo": (64, 2, 2, 1, 128, None),
    "tiny": (256, 2, 4, 1, 1024, True),
    "smoke": (256, 2, 4, 1, 1024, True),  # tiny at vocabulary SMOKE_VOCAB
    "qwen2.5-0.5b": (896, 24, 14, 2, 4864, True),
    "qwen2.5-1.5b": (1536, 28, 12, 2, 8960, True),
    "qwen2.5-3b": (2048, 36, 16, 2, 11008, True),
    "qwen2.5-7b": (3584, 28, 28, 4, 18944, False),
}
SHAPES: dict[str, dict[str, Any]] = {name: dict(zip(_FIELDS, row)) for name, row in _ROWS.items()}

# Mixtures of experts, built as Qwen3-MoE (every layer sparse, stacked experts, top-k probabilities
# renormalised), untied, at vocabulary 151,936 (`moe-smoke`: SMOKE_VOCAB). `qwen3-moe-1.6b-a0.6b` is
# Qwen3-30B-A3B (hidden 2048, 48 layers, 32 query heads of 128, 128 experts 768 wide, top-8) scaled
# down: hidden 1024, 24 layers, 16 query heads of 128 and 4 kv heads, 32 experts 512 wide, top-4:
# 1,645,796,352 parameters, 588,831,744 active (`rlhf_cluster.models.flops.parameter_counts`).
# `moe-smoke`: the same kind at the tiny MoE's size, for `make gpu-check` on the CPU.
_MOE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
)
_MOE_ROWS: dict[str, tuple[int, ...]] = {
    "moe-smoke": (64, 2, 2, 1, 32, 8, 2, 64),
    "qwen3-moe-1.6b-a0.6b": (1024, 24, 16, 4, 128, 32, 4, 512),
}
MOE_SHAPES: dict[str, dict[str, Any]] = {
    name: {**dict(zip(_MOE_FIELDS, row)), "tie_word_embeddings": False} for name, row in _MOE_ROWS.items()
}
SHAPES.update(MOE_SHAPES)


def build_model(shape: str, cache_dir: str) -> Path:
    """A random-weight Qwen2 of a published shape, saved once as an HF folder with the tiny tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if shape == "demo":
        from rlhf_cluster.config import TinyModelConfig
        from rlhf_cluster.models.tiny_model import ensure_tiny_model

        d = SHAPES["demo"]
        return Path(
            ensure_tiny_model(
                TinyModelConfig(
                    hidden_size=d["hidden_size"],
                    num_layers=d["num_hidden_layers"],
                    num_heads=d["num_attention_heads"],
                    num_kv_heads=d["num_key_value_heads"],
                ),
                cache_dir,
            )
        )
    vocab = SMOKE_VOCAB if shape in ("smoke", "moe-smoke") else VOCAB
    folder = Path(cache_dir).expanduser() / f"random-{shape}-v{vocab}"
    if (folder / "config.json").is_file():
        return folder
    _, tiny = random_model(64, 1, 128, cache_dir)  # its tokenizer files
    torch.manual_seed(0)
    scratch = folder.with_name(folder.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    if shape in MOE_SHAPES:
        random_moe(shape, vocab).save_pretrained(scratch)
    else:
        config = Qwen2Config(vocab_size=vocab, max_position_embeddings=32768, **SHAPES[shape])
        Qwen2ForCausalLM(config).save_pretrained(scratch)
    for f in Path(tiny).iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, scratch / f.name)
    scratch.rename(folder)
    return folder


def random_moe(shape: str, vocab: int):
    """A random Qwen3-MoE of `MOE_SHAPES[shape]` in bf16 (a 1.6B folder of 3.3 GB, not 6.6), its
    weights drawn on the GPU where there is one (seconds, where the CPU takes a minute)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=vocab,
        max_position_embeddings=32768,
        decoder_sparse_step=1,
        norm_topk_prob=True,
        **MOE_SHAPES[shape],
    )
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen3MoeForCausalLM(config)
    return model.bfloat16()


def long_batch(seq_len: int, tokens_per_step: int, vocab: int):
    """Sequences of about `seq_len` tokens (a quarter prompt, responses 80-100% of the rest),
    `tokens_per_step` // `seq_len` of them (at least one)."""
    prompt = seq_len // 4
    rest = seq_len - prompt
    return batch_of(max(1, tokens_per_step // seq_len), prompt, (rest * 4 // 5, rest), vocab)


def batch_of(n: int, prompt: int, response: tuple[int, int] | list[int], vocab: int):
    from rlhf_cluster.experience.records import TrainBatch

    rng = random.Random(0)
    samples = []
    for i in range(n):
        r = rng.randint(*response)
        samples.append(random_sample(rng, i, prompt, r, vocab, -6.0, "stop", prompt_id=f"p{i}"))
    return TrainBatch.from_samples(samples)


def join_one_rank_group() -> None:
    """torch.distributed at world size 1 on this machine's device: NCCL on CUDA, gloo on the CPU."""
    cuda = torch.cuda.is_available()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)


def device_and_peak() -> tuple[str, float | None]:
    """The device's name and its dense bf16 peak FLOP/s (None on the CPU or an unknown GPU)."""
    if not torch.cuda.is_available():
        return "cpu", None
    device = torch.cuda.get_device_name(0)
    return device, next((f for name, f in BF16_PEAK.items() if name in device), None)


def parameter_counts(config) -> tuple[int, int]:
    """`(total, active)` parameters of the model `config` describes (built on the meta device: no
    memory); active: an MoE's routed experts counted top_k/E (`rlhf_cluster.models.flops`)."""
    from transformers import AutoModelForCausalLM

    from rlhf_cluster.models.flops import parameter_counts as counts

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return counts(model)
