"""The compile-parity bisect's pure parts (benchmarks/gpu/gradient_parity.py's per-parameter
comparison; compile_parity.py's verdict and advice) on synthetic gradients, and the regional
compile's switch and fixes (rlhf_cluster/models/compiled.py) without compiling anything."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from benchmarks.gpu import compile_parity as cp
from benchmarks.gpu import gradient_parity as gp
from rlhf_cluster.models import compiled


def _grads(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    names = [f"model.layers.{i}.{p}" for i in range(2) for p in ("input_layernorm.weight", "mlp.up_proj.weight")]
    return {n: torch.randn(4, 8, generator=g) for n in names + ["model.embed_tokens.weight"]}


def test_only_the_norm_weights_that_differ_fail_and_come_first():
    eager = _grads()
    got = {n: t.clone() for n, t in eager.items()}
    for i in range(2):  # the RMSNorms' gradients off by a fifth, the rest reassociated (1e-6)
        got[f"model.layers.{i}.input_layernorm.weight"] *= 0.8
    got["model.embed_tokens.weight"] += 1e-6 * eager["model.embed_tokens.weight"]
    diffs = gp.compare_gradients(eager, got, gp.FP32_TOLERANCE)
    assert {d.name for d in diffs[:2]} == {f"model.layers.{i}.input_layernorm.weight" for i in (0, 1)}
    norm = diffs[0]
    assert not norm.passed and norm.rel_l2 == pytest.approx(0.2) and norm.cosine == pytest.approx(1.0)
    assert all(d.passed for d in diffs[2:])
    summary = gp.summarize(diffs, loss_eager=1.5, loss_compiled=1.5)
    assert not summary["passed"] and summary["failing_parameters"] == 2
    assert summary["failing_kinds"] == ["model.layers.*.input_layernorm.weight"]
    assert next(iter(summary["worst_by_kind"])) == "model.layers.*.input_layernorm.weight"


def test_a_sign_flip_a_missing_gradient_and_a_loss_difference_fail():
    eager = _grads()
    got = {n: t.clone() for n, t in eager.items() if n != "model.layers.1.mlp.up_proj.weight"}
    got["model.layers.0.mlp.up_proj.weight"] *= -1
    diffs = {d.name: d for d in gp.compare_gradients(eager, got, gp.FP32_TOLERANCE)}
    assert diffs["model.layers.0.mlp.up_proj.weight"].cosine == pytest.approx(-1.0)
    assert diffs["model.layers.0.mlp.up_proj.weight"].rel_l2 == pytest.approx(2.0)
    assert diffs["model.layers.1.mlp.up_proj.weight"].rel_l2 == float("inf")
    same = gp.compare_gradients(eager, eager, gp.FP32_TOLERANCE)
    assert gp.summarize(same, 2.0, 2.0)["passed"] and not gp.summarize(same, 2.0, 2.01)["passed"]
    zero = {"w": torch.zeros(3)}
    assert gp.compare_gradients(zero, zero, 1e-3)[0].passed  # no gradient on either side: equal


def test_bf16_tolerances_scale_eager_bf16s_own_error_with_the_fp32_floor():
    fp32 = {"a": torch.ones(100), "b": torch.ones(100)}
    eager_bf16 = {"a": torch.ones(100) * 1.01, "b": torch.ones(100)}
    tol = gp.bf16_tolerances(fp32, eager_bf16)
    assert tol["a"] == pytest.approx(gp.BF16_FACTOR * 0.01) and tol["b"] == gp.FP32_TOLERANCE
    got = {"a": torch.ones(100) * 1.015, "b": torch.ones(100) * 1.01}
    passed = {d.name: d.passed for d in gp.compare_gradients(fp32, got, tol)}
    assert passed == {"a": True, "b": False}


def _result(variant: cp.Variant, passed: bool) -> dict:
    return {"variant": dataclasses.asdict(variant), "passed": passed}


def test_the_verdict_is_the_first_variant_that_passes():
    first = cp.candidates(liger_installed=True)
    assert [v.name for v in first[:4]] == ["default", "mix-order reduction off", "inputs cloned", "liger off"]
    by_name = {v.name: v for v in first}
    fails_then = [_result(v, v.name in ("inputs cloned", "aot_eager backend")) for v in first]
    found = cp.verdict(fails_then)
    assert found["first_passing"] == "inputs cloned" and "pytorch#191002" in found["cause"]
    assert found["fix"]["clone_inputs"] is True
    mix = cp.verdict([_result(by_name["default"], False), _result(by_name["mix-order reduction off"], True)])
    assert "mix-order" in mix["cause"] and mix["fix"]["env"] == {"TORCHINDUCTOR_MIX_ORDER_REDUCTION": "0"}
    assert "flip CUDA_GRADIENTS_MATCH_EAGER" in cp.switch_advice(mix, holds=True)
    assert "set CUDA_FIX" not in cp.switch_advice(mix, holds=True)  # compiled.CUDA_FIX is this fix
    assert "keep it refused" in cp.switch_advice(mix, holds=False)
    assert "set CUDA_FIX" in cp.switch_advice(found, holds=True)
    diagnostic = cp.verdict([_result(by_name["default"], False), _result(by_name["aot_eager backend"], True)])
    assert diagnostic["fix"] is None and "compiler_bisector" in diagnostic["cause"]
    assert cp.verdict([_result(by_name["default"], True)])["cause"].startswith("not reproduced")
    alone = cp.verdict([_result(by_name["dynamo only"], True)])  # a smoke run's subset: no default to read against
    assert alone["first_passing"] == "dynamo only" and alone["fix"] is None and "not bisected" in alone["cause"]
    assert cp.switch_advice(alone, holds=False).startswith("none")
    nothing = cp.verdict([_result(v, False) for v in first] + [{"variant": {}, "error": "exit 1"}])
    assert nothing["first_passing"] is None and "before Inductor" in nothing["cause"]


def test_the_fix_is_confirmed_under_the_learners_other_settings():
    fix = cp.candidates(liger_installed=False)[1]
    on_cuda = cp.confirmations(fix, cuda=True, liger_installed=True)
    assert all(v.env == fix.env for v in on_cuda)
    assert {(v.precision, v.attention, v.liger) for v in on_cuda} == {
        ("bf16", "sdpa", None),
        ("none", "eager", None),
        ("none", "flex_attention", None),
        ("bf16", "flex_attention", None),
        ("none", "sdpa", False),
    }
    assert all(v.attention != "flex_attention" for v in cp.confirmations(fix, cuda=False, liger_installed=False))


def test_compile_layers_is_refused_on_cuda_naming_the_cause_unless_a_variant_runs(monkeypatch):
    """On since one H200's bisect (Liger's RMSNorm the cause); the switch off refuses, naming it."""
    layers = [torch.nn.Linear(2, 2)]
    assert compiled.CUDA_GRADIENTS_MATCH_EAGER
    monkeypatch.setattr(compiled, "CUDA_GRADIENTS_MATCH_EAGER", False)
    with pytest.raises(ValueError, match="learner.compile: on CUDA.*Liger's RMSNorm under compile"):
        compiled.compile_layers(layers, torch.device("cuda"))
    with compiled.compiled_as(compiled.CompileFix(clone_inputs=True), backend="eager"):
        assert compiled.compile_layers(layers, torch.device("cuda")) == 1  # compiles lazily: no CUDA needed
    assert compiled._variant is None
    x = torch.ones(1, 2, requires_grad=True)
    layers[0](x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the gradient flows through the clones


def test_inputs_are_cloned_and_the_fix_sets_inductors_setting_too(monkeypatch):
    seen = []
    call = compiled.with_cloned_inputs(lambda a, pair, n=0, kw=None: seen.append((a, pair, n, kw)))
    base = torch.arange(6.0)
    call(base[:3], (base[3:], base[:2]), n=2, kw=base)
    a, (cos, sin), n, kw = seen[0]
    storages = {t.untyped_storage().data_ptr() for t in (a, cos, sin, kw)}
    assert len(storages) == 4 and base.untyped_storage().data_ptr() not in storages and n == 2
    from torch._inductor import config

    monkeypatch.setenv("TORCHINDUCTOR_MIX_ORDER_REDUCTION", "1")
    # A torch with the setting (2.10-2.12 on CUDA) has it set too; this CPU build of 2.13 has none, and the
    # fix is then its environment variable alone (standing a setting in would leave inductor's config broken
    # for every later compile in the process).
    present = hasattr(config.triton, "mix_order_reduction")
    if present:
        monkeypatch.setattr(config.triton, "mix_order_reduction", True)
    compiled.apply_fix(compiled.CUDA_FIX)
    assert os.environ["TORCHINDUCTOR_MIX_ORDER_REDUCTION"] == "0"
    assert not present or config.triton.mix_order_reduction is False
    monkeypatch.setenv("TORCHINDUCTOR_NOT_A_SETTING", "")
    compiled.apply_fix(compiled.CompileFix(env={"TORCHINDUCTOR_NOT_A_SETTING": "1"}))  # no setting: the variable alone
    assert os.environ["TORCHINDUCTOR_NOT_A_SETTING"] == "1"
