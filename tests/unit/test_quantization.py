"""INT8 rollout weights: per-channel quantization, the compressed-tensors layout, push validation."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_cluster.models.quantization import (
    WeightSpecError,
    check_push,
    checkpoint_spec,
    dequantize_state_dict,
    quantize_state_dict,
    quantize_weight,
    write_int8_model_dir,
)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(32, 16, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(16, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(16, 24, generator=g),
        "model.layers.0.input_layernorm.weight": torch.ones(16),
        "lm_head.weight": torch.randn(32, 16, generator=g),
    }


def test_per_channel_symmetric_int8_error_is_at_most_half_a_step():
    w = torch.randn(64, 48, dtype=torch.float64) * torch.logspace(-3, 1, 64, dtype=torch.float64)[:, None]
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (64, 1) and scale.dtype == torch.float32
    assert int(q.abs().max()) <= 127
    # Each row's largest magnitude maps to +-127 exactly; rounding errs by at most half a step.
    assert torch.equal(q.abs().amax(dim=1), torch.full((64,), 127, dtype=torch.int8))
    err = (q.double() * scale.double() - w).abs()
    assert (err <= scale.double() / 2 * (1 + 1e-6)).all()


def test_all_zero_row_stays_zero():
    w = torch.zeros(3, 8)
    w[1] = torch.arange(8.0)
    q, scale = quantize_weight(w)
    assert torch.isfinite(scale).all()
    assert torch.equal(q[0], torch.zeros(8, dtype=torch.int8))


def test_only_decoder_projections_are_quantized():
    quantized = quantize_state_dict(_state(), torch.bfloat16)
    assert quantized["model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    assert quantized["model.layers.0.self_attn.q_proj.weight_scale"].shape == (16, 1)
    assert quantized["model.layers.0.mlp.down_proj.weight_scale"].shape == (16, 1)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight",
                 "model.layers.0.self_attn.q_proj.bias"):
        assert quantized[name].dtype == torch.bfloat16, name
        assert name + "_scale" not in quantized
    back = dequantize_state_dict(quantized)
    assert set(back) == set(_state())
    rel = (back["model.layers.0.mlp.down_proj.weight"] - _state()["model.layers.0.mlp.down_proj.weight"]).norm()
    assert rel / _state()["model.layers.0.mlp.down_proj.weight"].norm() < 0.01


def test_int8_model_dir_carries_the_quantization_config_and_layout(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (src / "tokenizer.json").write_text("{}")
    quantized = quantize_state_dict(_state(), torch.float32)
    out = write_int8_model_dir(src, quantized, tmp_path / "int8")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["quantization_config"]["ignore"] == ["lm_head"]
    assert (out / "tokenizer.json").is_file()
    spec = checkpoint_spec(out)
    assert spec["model.layers.0.self_attn.q_proj.weight"] == (torch.int8, (16, 16))
    assert spec["model.layers.0.self_attn.q_proj.weight_scale"] == (torch.float32, (16, 1))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp folder left behind"


def test_push_checks():
    quantized = quantize_state_dict(_state(), torch.float32)
    spec = {k: (v.dtype, tuple(v.shape)) for k, v in quantized.items()}
    check_push(spec, quantized.items())  # the store's int8 variant fits

    # Unquantized tensors into an int8 engine: refused, naming the tensor, dtype and the fix.
    with pytest.raises(WeightSpecError, match=r"q_proj.weight: got float32 \[16, 16\], expected int8.*") as info:
        check_push(spec, _state().items(), "gen0")
    assert "int8 variant" in str(info.value) and "gen0" in str(info.value)
    assert "missing" in str(info.value)  # no weight_scale tensors came with it

    wrong_shape = dict(quantized, **{"lm_head.weight": torch.zeros(31, 16)})
    with pytest.raises(WeightSpecError, match=r"lm_head.weight: got float32 \[31, 16\], expected float32 \[32, 16\]"):
        check_push(spec, wrong_shape.items())
    with pytest.raises(WeightSpecError, match="extra.weight: not a tensor of this engine"):
        check_push(spec, [*quantized.items(), ("extra.weight", torch.zeros(1))])
    # A float tensor of another width fits a float slot (the engine casts), an optional one may come.
    check_push(spec, [(k, v.bfloat16() if v.is_floating_point() and k.endswith("bias") else v) for k, v in quantized.items()])
    tied = {k: v for k, v in spec.items() if k != "lm_head.weight"}
    check_push(tied, quantized.items(), optional=frozenset({"lm_head.weight"}))


def test_a_push_may_leave_out_only_the_tensors_the_engine_says_it_may():
    state = _state()
    spec = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
    frozen = frozenset(k for k in spec if k.startswith("lm_head"))  # stands in for a frozen vision tower
    without = [(k, v) for k, v in state.items() if k not in frozen]
    check_push(spec, without, may_omit=frozen)
    check_push(spec, state.items(), may_omit=frozen)  # sent anyway (trained): it must still fit
    with pytest.raises(WeightSpecError, match="missing"):
        check_push(spec, without)
