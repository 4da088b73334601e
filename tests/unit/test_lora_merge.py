"""LoRA merge: our merged state dict equals peft's own `merge_and_unload` (real peft, tiny model)."""

from __future__ import annotations

import pytest
import torch

from rlhf_cluster.config import LoraConfig
from rlhf_cluster.models.lora import apply_lora, is_adapter_param, merge_lora_state_dict
from rlhf_cluster.models.modeling import load_causal_lm


def test_merged_state_equals_peft_merge_and_plain_names(tiny_model_path):
    base = load_causal_lm(tiny_model_path)
    plain_names = set(base.state_dict())
    cfg = LoraConfig(rank=4, alpha=8.0)
    model = apply_lora(load_causal_lm(tiny_model_path), cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter_param(n) for n in trainable)
    # B starts at 0: the merged model is the base model exactly.
    merged = merge_lora_state_dict(model.state_dict(), cfg.alpha / cfg.rank)
    assert set(merged) == plain_names
    assert all(torch.equal(merged[k], v) for k, v in base.state_dict().items())

    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_param(name):
                p.add_(0.05 * torch.randn_like(p))
    merged = merge_lora_state_dict(model.state_dict(), cfg.alpha / cfg.rank)
    expected = model.merge_and_unload().state_dict()
    assert set(merged) == set(expected)
    assert max((merged[k] - expected[k]).abs().max().item() for k in expected) < 1e-6
    changed = {k for k in expected if not torch.equal(merged[k], base.state_dict()[k])}
    assert changed and all(any(t in k for t in cfg.target_modules) for k in changed)


def test_unknown_target_module_names_the_field(tiny_model_path):
    with pytest.raises(ValueError, match=r"learner\.lora\.target_modules.*qkv"):
        apply_lora(load_causal_lm(tiny_model_path), LoraConfig(rank=2, target_modules=["qkv"]))
