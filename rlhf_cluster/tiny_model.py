"""Build a tiny random causal LM and a locally trained tokenizer, saved as a Hugging Face folder.

Nothing is downloaded: the tokenizer is a BPE trained with `tokenizers` on the built-in task's
text and the model is a randomly initialised Qwen2 or Llama. The folder is cached under a name
derived from the config, written to a temp name and renamed, so a crash never leaves a half
model behind and concurrent builders do not collide.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from rlhf_cluster.config import TinyModelConfig
from rlhf_cluster.data.tasks import arithmetic_corpus

PAD, EOS = "<pad>", "<eos>"


def build_tokenizer(vocab_size: int, out_dir: Path):
    """Train a BPE tokenizer (single-digit tokens, spaces kept) and save it as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    # Byte-level like GPT-2/Qwen, with single-digit tokens so sums are composed digit by digit.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(arithmetic_corpus(), trainer=trainer)
    # unk_token must be set: without it AutoTokenizer (what vLLM loads) adds its own special
    # token past the model's vocabulary.
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=EOS, padding_side="right"
    )
    fast.save_pretrained(out_dir)
    return fast


def build_model(cfg: TinyModelConfig, vocab_size: int, eos_id: int, pad_id: int):
    """A random causal LM of the configured shape (fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=eos_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(cfg.seed)
    if cfg.architecture == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common))
    return LlamaForCausalLM(LlamaConfig(**common))


def tiny_model_dir(cfg: TinyModelConfig, cache_dir: str | Path) -> Path:
    """The cache folder for a config: same shape and seed, same folder."""
    key = hashlib.sha256(json.dumps(cfg.model_dump(), sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser() / f"tiny-{cfg.architecture}-{key}"


def ensure_tiny_model(cfg: TinyModelConfig, cache_dir: str | Path) -> Path:
    """Return the cached tiny model folder, building it first if needed."""
    target = tiny_model_dir(cfg, cache_dir)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        tokenizer = build_tokenizer(cfg.vocab_size, tmp)
        model = build_model(cfg, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first; its folder is equivalent.
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
