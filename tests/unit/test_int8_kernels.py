"""Which int8 kernel each CPU kind runs, and the activation dtype it needs (issue 53).

vLLM's own selection (`check_cpu_sgl_kernel`) is asked; what is patched is only the capability
answers it and PyTorch read (`torch.cpu._is_amx_tile_supported`,
`torch.backends.cpu.get_cpu_capability`), so every branch runs on any x86 machine.
"""

from __future__ import annotations

import logging

import pytest
import torch

from rlhf_cluster.models import int8_kernels, quantization
from rlhf_cluster.models.int8_kernels import (
    amx_int8_layers,
    cpu_kind,
    cpu_kind_record,
    engine_linear_shapes,
    int8_engine_dtype,
)
from rlhf_cluster.models.quantization import Int8Linear, quantize_linears, quantize_state_dict

# (AMX tiles, PyTorch's kernel capability) of each kind vLLM and PyTorch tell apart.
KINDS = {"amx": (True, "AVX512"), "avx512": (False, "AVX512"), "avx2": (False, "AVX2")}
REAL_AMX = torch.cpu._is_amx_tile_supported()


@pytest.fixture(params=sorted(KINDS))
def kind(request, monkeypatch):
    amx, capability = KINDS[request.param]
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    return request.param


def _spec(hidden: int = 64, kv: int = 32, intermediate: int = 128) -> dict:
    g = torch.Generator().manual_seed(0)
    shapes = {
        "q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
        "gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden), "down_proj": (hidden, intermediate),
    }
    state = {"model.embed_tokens.weight": torch.randn(100, hidden, generator=g)}
    for layer in range(2):
        for name, shape in shapes.items():
            block = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            state[f"model.layers.{layer}.{block}.{name}.weight"] = torch.randn(*shape, generator=g)
    return {k: (v.dtype, tuple(v.shape)) for k, v in quantize_state_dict(state, torch.float32).items()}


def test_the_engine_builds_fused_linears_as_vllm_does():
    shapes = engine_linear_shapes(_spec())
    # Per layer: qkv_proj (64 + 32 + 32 outputs), gate_up_proj (128 + 128), o_proj, down_proj.
    assert sorted(shapes) == sorted([(128, 64), (256, 64), (64, 64), (64, 128)] * 2)


def test_an_int8_engine_takes_the_activations_its_kernel_needs(kind):
    spec = _spec()
    assert cpu_kind() == kind and cpu_kind_record()["cpu_kind"] == kind
    # AMX: vLLM's AMX kernel for every layer, and it takes no float32 activations.
    expected_layers = 8 if kind == "amx" else 0
    assert amx_int8_layers(engine_linear_shapes(spec)) == expected_layers
    assert int8_engine_dtype(spec, "float32") == ("bfloat16" if kind == "amx" else "float32")
    # A half-precision engine runs every kernel as asked.
    assert int8_engine_dtype(spec, "bfloat16") == "bfloat16" and int8_engine_dtype(spec, "float16") == "float16"


def test_shapes_the_amx_kernel_cannot_tile_keep_float32(kind):
    # N not a multiple of 16 and K not of 32: vLLM takes oneDNN for every layer even on AMX.
    spec = _spec(hidden=40, kv=20, intermediate=72)
    assert amx_int8_layers(engine_linear_shapes(spec)) == 0
    assert int8_engine_dtype(spec, "float32") == "float32"


def test_frozen_int8_scoring_picks_its_kernel_and_warns_only_where_slow(kind, monkeypatch, caplog):
    packed = []
    if not REAL_AMX:  # the AMX kernel's weight layout is built by vLLM's op, which needs AMX to run
        monkeypatch.setattr(torch.ops._C, "convert_weight_packed", lambda w: packed.append(w) or w.clone(), raising=False)
    block = torch.nn.Module()
    block.q_proj, block.lm_head = torch.nn.Linear(64, 32), torch.nn.Linear(64, 8)
    with caplog.at_level(logging.WARNING, logger=quantization.__name__):
        assert quantize_linears(block) == 1
    expected = "amx" if kind == "amx" else "int_mm"
    assert block.q_proj.kernel == expected and (block.q_proj.weight_packed is not None) == (kind == "amx")
    assert not packed or kind == "amx"
    # Only torch._int_mm on PyTorch's AVX2 kernels is slower than float (benchmarks/README.md).
    assert ("no AVX-512" in caplog.text) == (kind == "avx2"), caplog.text


@pytest.mark.parametrize("amx", [False, pytest.param(True, marks=pytest.mark.skipif(
    not REAL_AMX, reason="vLLM's AMX int8 kernel runs only on a CPU with AMX tiles; its choice is tested above"))])
def test_each_int8_linear_kernel_matches_float_within_quantization_error(amx, monkeypatch):
    monkeypatch.setattr(quantization, "amx_int8_kernel_applies", lambda n, k: amx)
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(3, 5, 64)
    q = Int8Linear(linear)
    assert q.kernel == ("amx" if amx else "int_mm")
    out = q(x)
    assert out.shape == (3, 5, 32) and out.dtype == torch.float32
    rel = (out - linear(x)).norm() / linear(x).norm()
    assert rel < 0.02, rel  # ~0.5-1% expected from int8 weights and activations (bf16 ones on AMX)
    assert rel > 1e-5, "int8 must differ from fp32 a little: was it quantized at all?"


def test_without_vllm_no_layer_takes_the_amx_kernel(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name.startswith("vllm"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(builtins, "__import__", no_vllm)
    assert int8_kernels.amx_int8_kernel_applies(64, 64) is False
