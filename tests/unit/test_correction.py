import math

import pytest
import torch

from rlhf_cluster.algorithms import importance_weights

MASK = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)


def _ref(prox, roll, mask, level, mode, cap, lower):
    out = [[0.0] * len(prox[0]) for _ in prox]
    for i in range(len(prox)):
        idx = [t for t in range(len(prox[i])) if mask[i][t]]
        d = {t: min(max(prox[i][t] - roll[i][t], -20), 20) for t in idx}
        for t in idx:
            if level == "token":
                rho = math.exp(d[t])
            elif level == "sequence":
                rho = math.exp(min(max(sum(d.values()), -20), 20))
            else:
                rho = math.exp(sum(d.values()) / len(idx))
            if mode == "truncate":
                out[i][t] = min(rho, cap) if lower is None else min(max(rho, lower), cap)
            else:
                ok = rho <= cap and (lower is None or rho >= lower)
                out[i][t] = rho if ok else 0.0
    return out


def _data(seed=0, scale=0.4):
    g = torch.Generator().manual_seed(seed)
    roll = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 2
    prox = roll + torch.randn(3, 5, generator=g, dtype=torch.float64) * scale
    return prox, roll


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_weights_match_loop(level, mode):
    prox, roll = _data()
    roll[0, 4] = -math.inf  # garbage on padding must not leak
    for cap, lower in [(2.0, None), (1.2, 0.8), (1.05, 0.95)]:
        w, met = importance_weights(prox, roll, MASK, level=level, mode=mode, cap=cap, lower=lower)
        want = torch.tensor(_ref(prox.tolist(), roll.tolist(), MASK.tolist(), level, mode, cap, lower),
                            dtype=torch.float64)
        torch.testing.assert_close(w, want)
        assert (w[~MASK] == 0).all()
        valid = want[MASK]
        assert met["weight_mean"] == pytest.approx(valid.mean().item())
        assert met["weight_max"] == pytest.approx(valid.max().item())
        if valid.square().sum() > 0:
            assert met["ess"] == pytest.approx((valid.sum() ** 2 / (valid.numel() * valid.square().sum())).item())
        # 0-dim tensors: the learner reads a whole step's metrics at once, never waiting inside it.
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in met.values())


def test_metrics_hand():
    roll = torch.zeros(1, 4, dtype=torch.float64)
    prox = torch.log(torch.tensor([[0.5, 1.0, 3.0, 9.0]], dtype=torch.float64))
    m = torch.tensor([[1, 1, 1, 0]])
    w, met = importance_weights(prox, roll, m, mode="truncate", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[0.5, 1.0, 2.0, 0.0]], dtype=torch.float64))
    assert met["frac_truncated"] == pytest.approx(1 / 3) and "frac_truncated_low" not in met
    d = [math.log(0.5), 0.0, math.log(3.0)]
    assert met["mismatch_k1"] == pytest.approx(-sum(d) / 3)
    assert met["mismatch_k3"] == pytest.approx(sum(math.exp(x) - 1 - x for x in d) / 3)
    assert met["ess"] == pytest.approx(3.5**2 / (3 * 5.25))
    w, met = importance_weights(prox, roll, m, mode="mask", cap=2.0, lower=0.9)
    torch.testing.assert_close(w, torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64))
    assert met["frac_masked"] == pytest.approx(2 / 3)


def test_ess_one_when_weights_equal():
    _, roll = _data(1)
    # Constant delta: equal token/geometric weights; sequence weights are equal only for equal lengths.
    for level, m in [("token", MASK), ("geometric", MASK), ("sequence", torch.ones_like(MASK))]:
        w, met = importance_weights(roll + 0.01, roll, m, level=level, cap=100.0)
        assert met["ess"] == pytest.approx(1.0)
    _, met = importance_weights(roll + 0.01, roll, MASK, level="sequence", cap=100.0)
    assert met["ess"] < 1.0


def test_no_gradient_and_clamped():
    prox, roll = _data(2)
    prox.requires_grad_()
    w, _ = importance_weights(prox, roll, MASK, level="sequence")
    assert not w.requires_grad
    big = torch.full((1, 5), 30.0)
    for level in ("token", "sequence", "geometric"):
        w, met = importance_weights(big, torch.zeros(1, 5), torch.ones(1, 5), level=level, mode="mask", cap=None)
        assert torch.isfinite(w).all() and w.max().item() == pytest.approx(math.exp(20), rel=1e-5)
        assert math.isfinite(met["mismatch_k3"])


def test_invalid_args():
    prox, roll = _data()
    with pytest.raises(ValueError, match="token, sequence, geometric"):
        importance_weights(prox, roll, MASK, level="segment")
    with pytest.raises(ValueError, match="truncate, mask"):
        importance_weights(prox, roll, MASK, mode="clip")


def test_truncate_clamps_from_below_when_lower_is_set():
    # slime --tis-clip-low / TRL clip_min: truncate mode raises a small weight to `lower` (it was ignored).
    roll = torch.zeros(1, 4, dtype=torch.float64)
    prox = torch.log(torch.tensor([[0.5, 1.0, 3.0, 0.1]], dtype=torch.float64))
    m = torch.tensor([[1, 1, 1, 0]])
    w, met = importance_weights(prox, roll, m, mode="truncate", cap=2.0, lower=0.9)
    torch.testing.assert_close(w, torch.tensor([[0.9, 1.0, 2.0, 0.0]], dtype=torch.float64))
    assert met["frac_truncated"] == pytest.approx(1 / 3)  # lowered to the cap
    assert met["frac_truncated_low"] == pytest.approx(1 / 3)  # raised to `lower` (padding not counted)
    assert met["weight_mean"] == pytest.approx(3.9 / 3)
    assert met["ess"] == pytest.approx(3.9**2 / (3 * 5.81))
    # A sequence weight below `lower` lifts every token of the sequence.
    w, met = importance_weights(prox, roll, m, level="sequence", mode="truncate", cap=2.0, lower=2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 2.0, 2.0, 0.0]], dtype=torch.float64))  # rho = 1.5
    assert met["frac_truncated_low"] == pytest.approx(1.0) and met["frac_truncated"] == 0


def test_learner_objective_passes_lower_in_truncate_mode():
    from rlhf_cluster.config import AlgorithmConfig
    from rlhf_cluster.learner.objective import RLObjective

    cfg = AlgorithmConfig(correction={"mode": "truncate", "cap": 2.0, "lower": 0.9})
    roll = torch.zeros(1, 3, dtype=torch.float64)
    prox = torch.log(torch.tensor([[0.5, 1.0, 3.0]], dtype=torch.float64))
    w, met = RLObjective(cfg, max_tokens=3).correction_weights(prox, roll, torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(w, torch.tensor([[0.9, 1.0, 2.0]], dtype=torch.float64))
    assert met["correction/frac_truncated_low"] == pytest.approx(1 / 3)


def test_a_lower_bound_above_the_cap_is_refused():
    from rlhf_cluster.config import AlgorithmConfig

    """Found in review: truncate now clamps to [lower, cap]; lower > cap made every weight the cap."""
    with pytest.raises(ValueError, match="algorithm.correction.lower=3 is above cap=2"):
        AlgorithmConfig(correction={"mode": "truncate", "cap": 2.0, "lower": 3.0})
