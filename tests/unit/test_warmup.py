"""The supervised warm-up learns the task's answers, is cached, and trains only on answer tokens."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.data.tasks import arithmetic_rows, held_out_pairs
from rlhf_cluster.job.warmup import ensure_warmed_model


def _answer_logprob(path, prompt: Prompt) -> float:
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    p, a = tok(prompt.text)["input_ids"], tok(prompt.answer)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([p + a])
    with torch.no_grad():
        logp = model(ids).logits.log_softmax(-1)[0]
    return float(sum(logp[len(p) - 1 + i, t] for i, t in enumerate(a)))


def test_warmup_raises_answer_likelihood_and_is_cached(tiny_model_path):
    prompts = [Prompt(r["prompt_id"], r["prompt"], r["answer"]) for r in arithmetic_rows(64, 0, "train", max_operand=9)]
    calls = []
    warmed = ensure_warmed_model(tiny_model_path, prompts, steps=30, lr=3e-3, batch_size=16,
                                 progress=lambda step, loss: calls.append(loss))
    assert len(calls) == 30 and calls[-1] < calls[0]
    assert _answer_logprob(warmed, prompts[0]) > _answer_logprob(tiny_model_path, prompts[0]) + 1.0
    mtime = (warmed / "model.safetensors").stat().st_mtime
    again = ensure_warmed_model(tiny_model_path, prompts, steps=30, lr=3e-3, batch_size=16,
                                progress=lambda *_: calls.append(None))
    assert again == warmed and len(calls) == 30 and (warmed / "model.safetensors").stat().st_mtime == mtime


def test_small_operand_range_keeps_held_out_pairs_apart():
    held = held_out_pairs(9)
    assert held == 30
    eval_rows = arithmetic_rows(held, 0, "eval", max_operand=9)
    train_rows = arithmetic_rows(500, 0, "train", max_operand=9)
    assert not {r["prompt"] for r in eval_rows} & {r["prompt"] for r in train_rows}
    assert all(int(r["answer"]) <= 18 for r in train_rows)
