"""Liger's kernels on the learner's model (issue 54): where they apply, what is refused, and which
kernels are asked for (a stand-in module records the call: liger-kernel runs only on CUDA)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from rlhf_cluster.models import liger

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


@pytest.fixture
def fake_liger(monkeypatch):
    calls = []
    module = types.ModuleType("liger_kernel.transformers")
    module._apply_liger_kernel_to_instance = lambda model, **kw: calls.append((model, kw))
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", module)
    return calls


def test_by_default_only_on_cuda_with_the_package(fake_liger, monkeypatch):
    model = torch.nn.Linear(2, 2)
    assert liger.apply_liger(model, CPU, None) == [] and fake_liger == []
    assert liger.apply_liger(model, CUDA, None) == ["rms_norm", "swiglu"]
    [(got, kwargs)] = fake_liger
    # RoPE would patch the model type's module for every model in the process; the output layer is ours.
    assert got is model and kwargs["rope"] is False and kwargs["fused_linear_cross_entropy"] is False
    assert liger.apply_liger(model, CUDA, False) == []


def test_asking_for_them_where_they_cannot_run_is_refused(monkeypatch):
    monkeypatch.setattr(liger, "liger_available", lambda: False)
    assert liger.apply_liger(torch.nn.Linear(2, 2), CUDA, None) == []
    with pytest.raises(ValueError, match="not installed"):
        liger.apply_liger(torch.nn.Linear(2, 2), CUDA, True)
    with pytest.raises(ValueError, match="needs CUDA"):
        liger.apply_liger(torch.nn.Linear(2, 2), CPU, True)


def test_a_mixture_of_experts_keeps_its_own_experts(model_cache, tiny_model_path):
    """Liger's swiglu swaps an MoE's experts for its fused MoE (0.1% MFU on one H200): RMSNorm only."""
    from rlhf_cluster.config import TinyModelConfig
    from rlhf_cluster.models.liger import liger_kernels
    from rlhf_cluster.models.modeling import load_causal_lm
    from rlhf_cluster.models.tiny_model import ensure_tiny_model

    moe = load_causal_lm(str(ensure_tiny_model(TinyModelConfig(architecture="qwen3_moe"), model_cache)))
    assert liger_kernels(moe) == {"rms_norm": True, "swiglu": False, "rope": False, "cross_entropy": False,
                                  "fused_linear_cross_entropy": False}
    assert liger_kernels(load_causal_lm(tiny_model_path))["swiglu"] is True


def test_the_model_types_module_is_put_back(tiny_model_path, fake_liger, monkeypatch):
    """Liger's call also swaps the classes in the model type's module (for every model loaded after
    it: a CPU model then reached a Triton kernel on one H200); `apply_liger` puts them back, while
    the instance keeps what was done to it."""
    from transformers.models.qwen2 import modeling_qwen2

    from rlhf_cluster.models.modeling import load_causal_lm

    model = load_causal_lm(tiny_model_path)
    norm = modeling_qwen2.Qwen2RMSNorm

    def like_liger(model, **kwargs):
        modeling_qwen2.Qwen2RMSNorm = torch.nn.Identity  # what Liger's apply_liger_kernel_to_qwen2 does
        model.model.norm = torch.nn.Identity()

    monkeypatch.setattr(sys.modules["liger_kernel.transformers"], "_apply_liger_kernel_to_instance", like_liger)
    assert liger.apply_liger(model, CUDA, True) == ["rms_norm", "swiglu"]
    assert modeling_qwen2.Qwen2RMSNorm is norm, "the module's class is put back"
    assert isinstance(model.model.norm, torch.nn.Identity), "the instance keeps its kernels"
    assert isinstance(load_causal_lm(tiny_model_path).model.norm, norm)


def test_compile_leaves_liger_out():
    """Dynamo cannot trace Liger's RMSNorm (torch 2.11, one H200): asked for both, the config says so."""
    from rlhf_cluster.config import JobConfig

    with pytest.raises(ValueError, match="liger_kernels: true does not run with learner.compile"):
        JobConfig.model_validate({"learner": {"compile": True, "liger_kernels": True}})
    assert JobConfig.model_validate({"learner": {"compile": True}}).learner.liger_kernels is None
