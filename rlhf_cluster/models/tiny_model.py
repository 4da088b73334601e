"""Build a tiny random causal LM and a locally trained tokenizer, saved as a Hugging Face folder.

Nothing is downloaded: the tokenizer is a BPE trained with `tokenizers` on the built-in task's
text and the model is a randomly initialised Qwen2 or Llama, a Qwen3-MoE (a few experts,
top-2), or a Qwen2.5-VL (`tiny_vlm`: a small vision tower before the dense LM, with its
processor). The folder is cached under a name derived from the config, written to a temp name and
renamed, so a crash never leaves a half model behind and concurrent builders do not collide.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from rlhf_cluster.config import TinyModelConfig
from rlhf_cluster.config.inputs import MOE_FIELDS, VISION_FIELDS
from rlhf_cluster.data.tasks import arithmetic_corpus
from rlhf_cluster.data.tool_task import tool_arithmetic_corpus
from rlhf_cluster.data.visual_task import visual_corpus

PAD, EOS = "<pad>", "<eos>"


def tokenizer_corpus(corpus: str) -> list[str]:
    """The text a tiny tokenizer is trained on: the arithmetic task's, plus tool episodes for the tool task."""
    if corpus == "visual":  # the visual tasks' questions and answers: each answer a token or two
        return arithmetic_corpus() + visual_corpus()
    return arithmetic_corpus() + (tool_arithmetic_corpus() if corpus == "tool_arithmetic" else [])


def build_tokenizer(vocab_size: int, out_dir: Path, corpus: str = "arithmetic", extra_special: tuple[str, ...] = ()):
    """Train a BPE tokenizer (single-digit tokens, spaces kept) and save it as a HF fast tokenizer.

    `extra_special` are special tokens after pad and EOS (the vision-language model's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    # Byte-level like GPT-2/Qwen, with single-digit tokens so sums are composed digit by digit.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(tokenizer_corpus(corpus), trainer=trainer)
    # unk_token must be set: without it AutoTokenizer (what vLLM loads) adds its own special
    # token past the model's vocabulary.
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=EOS, padding_side="right"
    )
    fast.save_pretrained(out_dir)
    return fast


# Each shape field of `TinyModelConfig` by its name in a Hugging Face Llama/Qwen2 config.
_HF_SHAPE_NAMES = {
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "max_position_embeddings": "max_position_embeddings",
}


def build_model(cfg: TinyModelConfig, vocab_size: int, eos_id: int, pad_id: int):
    """A random causal LM of the configured shape (fp32)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    shape = {hf_name: getattr(cfg, name) for name, hf_name in _HF_SHAPE_NAMES.items()}
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        **shape,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=eos_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
        initializer_range=cfg.initializer_range,
    )
    torch.manual_seed(cfg.seed)
    if cfg.architecture == "qwen3_moe":
        # Every layer sparse; head_dim said outright (Qwen3 does not derive it from the width;
        # transformers passes it through to config.json though its config class does not declare it).
        common["head_dim"] = cfg.hidden_size // cfg.num_heads
        moe = Qwen3MoeConfig(
            **common,
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            moe_intermediate_size=cfg.moe_intermediate_size,
            decoder_sparse_step=1,
            norm_topk_prob=True,
        )
        return Qwen3MoeForCausalLM(moe)
    if cfg.architecture == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common))
    return LlamaForCausalLM(LlamaConfig(**common))


def tiny_model_dir(cfg: TinyModelConfig, cache_dir: str | Path) -> Path:
    """The cache folder for a config: same shape and seed, same folder."""
    # The default corpus and init, a dense model's MoE fields and a text model's vision fields are left out
    # of the key: folders built before they existed keep their names.
    exclude = ({"corpus"} if cfg.corpus == "arithmetic" else set()) | (set() if cfg.is_moe else set(MOE_FIELDS))
    exclude |= set() if cfg.is_vision else set(VISION_FIELDS)
    exclude |= {"initializer_range"} if cfg.initializer_range == 0.02 else set()
    shape = cfg.model_dump(exclude=exclude)
    key = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser() / f"tiny-{cfg.architecture}-{key}"


def ensure_tiny_model(cfg: TinyModelConfig, cache_dir: str | Path) -> Path:
    """Return the cached tiny model folder, building it first if needed."""
    target = tiny_model_dir(cfg, cache_dir)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        if cfg.is_vision:
            from rlhf_cluster.models.tiny_vlm import VISION_TOKENS, write_tiny_vlm

            write_tiny_vlm(cfg, build_tokenizer(cfg.vocab_size, tmp, cfg.corpus, VISION_TOKENS), tmp)
            return _publish(tmp, target)
        tokenizer = build_tokenizer(cfg.vocab_size, tmp, cfg.corpus)
        model = build_model(cfg, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        return _publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, target: Path) -> Path:
    """Rename a finished build folder to its cache name."""
    try:
        os.rename(tmp, target)
    except OSError:
        # Another process finished first; its folder is equivalent.
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_long_tail_model(source: str | Path, eos_rate: float, out_dir: str | Path, seed: int = 0) -> Path:
    """A copy of a tiny model whose response lengths are long-tailed, like real RL responses.

    A random model almost never samples EOS, so every response runs to `max_new_tokens`. Here
    the EOS row of `lm_head` is set along the mean direction of the model's final hidden states,
    scaled so that EOS has probability `eos_rate` on average over positions of random text: the
    stopping point becomes roughly geometric (lengths spread over more than 10x). Benchmarks and
    tests of long-tail generation use it; written once per (source, rate, seed).
    """
    from transformers import AutoTokenizer

    from rlhf_cluster.fileio import write_dir_atomic
    from rlhf_cluster.models.modeling import load_causal_lm

    target = Path(out_dir).expanduser() / f"{Path(source).name}-eos{eos_rate:g}-s{seed}"
    if (target / "model.safetensors").is_file():
        return target
    model = load_causal_lm(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    eos = tokenizer.eos_token_id
    ids = torch.randint(2, model.config.vocab_size, (16, 48), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state.reshape(-1, model.config.hidden_size)
        logits = model.lm_head(hidden)
        direction = hidden.mean(0) / hidden.mean(0).norm()
        projection = hidden @ direction

        def mean_eos_prob(scale: float) -> float:
            eos_logits = scale * projection
            others = torch.cat([logits[:, :eos], logits[:, eos + 1 :]], dim=1)
            return torch.sigmoid(eos_logits - torch.logsumexp(others, dim=1)).mean().item()

        low, high = 0.0, 1.0
        while mean_eos_prob(high) < eos_rate:  # the projection's mean is positive by construction
            low, high = high, high * 2
            if high > 1e6:
                raise ValueError(f"{source}: cannot raise the EOS probability to {eos_rate}")
        for _ in range(50):
            mid = (low + high) / 2
            low, high = (mid, high) if mean_eos_prob(mid) < eos_rate else (low, mid)
        model.lm_head.weight[eos] = high * direction

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return write_dir_atomic(target, write)
