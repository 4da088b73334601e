import math

import pytest
import torch

from rlhf_cluster.algorithms import AdaptiveKLController, FixedKLController, kl_penalty


def test_kl_hand_values():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])  # log r = -1
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(1.0)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(math.exp(-1.0))


def test_kl_matches_loop_and_k3_nonnegative():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(5, 7, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(5, 7, generator=g, dtype=torch.float64) * 3
    for est in ("k1", "k2", "k3"):
        out = kl_penalty(logp, ref, est)
        for i in range(5):
            for t in range(7):
                lr = ref[i, t].item() - logp[i, t].item()
                want = {"k1": -lr, "k2": 0.5 * lr * lr, "k3": math.exp(lr) - 1 - lr}[est]
                assert out[i, t].item() == pytest.approx(want, abs=1e-12)
    big = torch.randn(1000, generator=g) * 10
    assert (kl_penalty(big, torch.randn(1000, generator=g) * 10, "k3") >= 0).all()


def test_k3_clamped_finite():
    out = kl_penalty(torch.tensor([-500.0, 0.0]), torch.tensor([0.0, -500.0]), "k3")
    assert torch.isfinite(out).all()


def test_unknown_estimator():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")


def test_fixed_controller():
    c = FixedKLController(0.05)
    c.update(100.0, 10)
    assert c.value == 0.05
    d = FixedKLController(1.0)
    d.load_state_dict(c.state_dict())
    assert d.value == 0.05


def test_adaptive_controller_formula_and_state():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(9.0, 256)  # error clipped to +0.2
    want = 0.1 * (1 + 0.2 * 256 / 10000)
    assert c.value == pytest.approx(want)
    c.update(6.6, 100)  # error 0.1
    want *= 1 + 0.1 * 100 / 10000
    assert c.value == pytest.approx(want)
    c.update(torch.tensor(0.0), 50)  # error clipped to -0.2
    want *= 1 - 0.2 * 50 / 10000
    assert c.value == pytest.approx(want)
    d = AdaptiveKLController(1.0, target=1.0, horizon=1.0)
    d.load_state_dict(c.state_dict())
    assert d.state_dict() == c.state_dict()
    c.update(3.0, 10)
    d.update(3.0, 10)
    assert d.value == c.value


def test_k3_log_ratio_clamp_matches_a_float64_reference_and_bounds_the_gradient():
    logp = torch.tensor([[-0.1, -6.0, -0.5, -12.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-0.2, -0.1, -0.4, -0.3]], dtype=torch.float64)
    clamped = kl_penalty(logp, ref, "k3", k3_clamp=4.0)
    for got, lp, rf in zip(clamped[0].tolist(), logp[0].tolist(), ref[0].tolist()):
        log_r = min(max(rf - lp, -4.0), 4.0)
        assert got == pytest.approx(math.exp(log_r) - 1 - log_r, rel=1e-14)
    clamped.sum().backward()
    assert logp.grad[0, 1] == 0 and logp.grad[0, 3] == 0  # log r = 5.9 and 11.7: clamped, no push
    assert logp.grad[0, 0] != 0 and logp.grad[0, 2] != 0
    # Off (None): unchanged estimator, only the overflow guard.
    assert torch.equal(kl_penalty(logp.detach(), ref, "k3"), kl_penalty(logp.detach(), ref, "k3", None))
