"""The frozen models' token budget (`scoring.max_tokens_per_batch: auto`): 8,192 on a CPU, sized
by the free memory on a GPU (the device's answer patched, as the CPU kind is in other tests), and a
forward that runs out of memory halves the budget and goes again without losing or reordering a
response."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.scoring import batching
from rlhf_cluster.scoring.reference import ReferenceModel

# Qwen2.5-0.5B's shape: 896 wide, MLP 4,864, 14 heads of 64, 2 KV heads.
QWEN_05B = AutoConfig.for_model("qwen2", hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                                num_key_value_heads=2)


def test_auto_is_the_cpu_budget_on_a_cpu_and_what_fits_on_a_gpu(monkeypatch):
    assert batching.tokens_per_batch("auto", torch.device("cpu"), [QWEN_05B], 2) == 8192
    assert batching.tokens_per_batch(4096, torch.device("cuda"), [QWEN_05B], 2) == 4096  # a number is kept
    per_token = batching.activation_bytes_per_token(QWEN_05B, 2)
    assert per_token == 2 * (4 * 896 + 2 * 2 * 64 + 3 * 4864)
    for free, expected in ((70 << 30, 65536), (1 << 30, (1 << 29) // per_token), (64 << 20, 8192)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 80 << 30))
        assert batching.tokens_per_batch("auto", torch.device("cuda"), [QWEN_05B], 2) == expected


def test_a_forward_out_of_memory_halves_the_budget_and_scores_everything(tiny_model_path, monkeypatch):
    model = ReferenceModel(tiny_model_path, max_tokens_per_batch=65536)
    rollouts = [Rollout(sample_id=f"s{i}", prompt_id="p", group_id="g", prompt_ids=[5] * 100,
                        response_ids=[7] * (50 + i % 7), rollout_logprobs=[-1.0] * (50 + i % 7), policy_version=0,
                        finish_reason="stop") for i in range(200)]
    sizes = []

    def score(batch):
        tokens = sum(len(r.prompt_ids) + len(r.response_ids) for r in batch)
        if tokens > 20_000:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        sizes.append(tokens)
        return [[float(r.sample_id[1:])] * len(r.response_ids) for r in batch]

    monkeypatch.setattr(model, "_score", score)
    out = model.logprobs(rollouts)
    assert [row[0] for row in out] == [float(i) for i in range(200)]  # every response, in order
    assert [len(row) for row in out] == [len(r.response_ids) for r in rollouts]
    assert model.max_tokens_per_batch == 16384 and max(sizes) <= 16384  # 65,536 -> 32,768 -> 16,384, kept
    assert model.tokens == sum(len(r.response_ids) for r in rollouts) and model.seconds > 0
    monkeypatch.setattr(model, "_score", lambda batch: (_ for _ in ()).throw(torch.OutOfMemoryError("always")))
    model.max_tokens_per_batch = 8192
    with pytest.raises(torch.OutOfMemoryError):  # at the CPU budget it gives up: the cause, not a loop
        model.logprobs(rollouts[:10])
