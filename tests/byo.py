"""A user's own model and data, built in code the way a user's would arrive on disk: a
Qwen2-architecture folder written by `save_pretrained` (random weights, a BPE tokenizer with a
ChatML chat template) and a GSM8K-format parquet (`question`, `answer` ending in `#### N`)."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def gsm8k_rows(count: int, seed: int = 0) -> list[dict]:
    """Word problems in GSM8K's format: a question, and an answer with its reasoning and `#### N`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        rows.append({
            "question": f"Sam has {a} apples and buys {b} more. How many apples does Sam have?",
            "answer": f"Sam has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}",
        })
    return rows


def write_gsm8k_parquet(path: Path, count: int = 64, seed: int = 0) -> Path:
    pq.write_table(pa.Table.from_pylist(gsm8k_rows(count, seed)), path)
    return path


def save_chat_model(out_dir: Path, seed: int = 0, positions: int = 512) -> Path:
    """A Qwen2 causal LM (random weights) and a ChatML tokenizer, saved as a HF folder; `positions`:
    its max_position_embeddings (rotary: a number in its config, no weights)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [r["question"] + " " + r["answer"] for r in gsm8k_rows(500, seed + 1)]
    tok.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<|endoftext|>", chat_template=CHATML)
    tokenizer.save_pretrained(out_dir)
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=positions,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    Qwen2ForCausalLM(config).save_pretrained(out_dir)
    return out_dir
