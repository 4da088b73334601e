import math

import pytest
import torch

from rlhf_cluster.algorithms import (
    entropy,
    entropy_from_logits,
    kl_loss,
    kl_penalty,
    masked_mean,
    masked_sum,
    policy_loss,
    value_loss,
)

MASK = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])


def _data(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(4, 6, generator=g, dtype=dtype) * 2
    logp = old + torch.randn(4, 6, generator=g, dtype=dtype) * 0.3
    adv = torch.randn(4, 6, generator=g, dtype=dtype)
    return logp, old, adv


def _ref_policy(logp, old, adv, mask, cl, ch, agg, w=None, max_tokens=None):
    B, T = len(logp), len(logp[0])
    per_seq, total, n_tok = [], 0.0, 0
    for i in range(B):
        s = 0.0
        n = sum(mask[i])
        for t in range(T):
            if not mask[i][t]:
                continue
            r = math.exp(logp[i][t] - old[i][t])
            a = adv[i][t]
            pg = max(-a * r, -a * min(max(r, 1 - cl), 1 + ch)) * (w[i][t] if w else 1.0)
            s += pg
        total += s
        n_tok += n
        per_seq.append(s / n)
    if agg == "token_mean":
        return total / n_tok
    if agg == "sequence_mean":
        return sum(per_seq) / B
    return total / (B * (max_tokens or T))


@pytest.mark.parametrize("agg", ["token_mean", "sequence_mean", "sequence_sum_norm"])
def test_policy_loss_matches_loop(agg):
    logp, old, adv = _data()
    w = torch.rand(4, 6, dtype=torch.float64) * 2
    for corr in (None, w):
        loss, _ = policy_loss(logp, old, adv, MASK, clip_low=0.2, clip_high=0.28, aggregation=agg, correction=corr)
        want = _ref_policy(logp.tolist(), old.tolist(), adv.tolist(), MASK.tolist(), 0.2, 0.28, agg,
                           corr.tolist() if corr is not None else None)
        assert loss.item() == pytest.approx(want, rel=1e-12)


def test_policy_metrics_hand():
    ratios = torch.tensor([[0.5, 0.5, 1.5, 1.5, 1.0, 3.0]])
    adv = torch.tensor([[-1.0, 1.0, 1.0, -1.0, 1.0, 1.0]])
    m = torch.tensor([[1, 1, 1, 1, 1, 0]])
    logp = torch.log(ratios)
    _, met = policy_loss(logp, torch.zeros_like(logp), adv, m)
    assert met["clip_frac_low"] == pytest.approx(1 / 5)
    assert met["clip_frac_high"] == pytest.approx(1 / 5)
    assert met["clip_frac"] == pytest.approx(2 / 5)
    assert met["ratio_mean"] == pytest.approx(5.0 / 5)
    assert met["ratio_max"] == pytest.approx(1.5)
    r = ratios[0, :5]
    assert met["approx_kl"] == pytest.approx(((r - 1) - r.log()).mean().item(), rel=1e-6)
    # 0-dim tensors: the learner reads a whole step's metrics at once, never waiting inside it.
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in met.values())


def test_clipped_tokens_get_zero_gradient():
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.1]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0]], dtype=torch.float64)
    logp = torch.log(ratios).requires_grad_()
    loss, _ = policy_loss(logp, torch.zeros_like(logp), adv, torch.ones(1, 5))
    loss.backward()
    g = logp.grad[0]
    assert g[0].item() == 0.0 and g[1].item() == 0.0  # clip active
    # Unclipped: d(-A r)/dlogp / N = -A r / 5
    torch.testing.assert_close(g[2:], (-adv[0, 2:] * ratios[0, 2:]) / 5)


def test_correction_carries_no_gradient():
    logp, old, adv = _data(1)
    logp.requires_grad_()
    corr = (torch.rand(4, 6, dtype=torch.float64) * 2).requires_grad_()
    loss, _ = policy_loss(logp, old, adv, MASK, correction=corr)
    loss.backward()
    assert corr.grad is None
    assert logp.grad is not None
    want = _ref_policy(logp.tolist(), old.tolist(), adv.tolist(), MASK.tolist(), 0.2, 0.2, "token_mean",
                       corr.tolist())
    assert loss.item() == pytest.approx(want, rel=1e-12)


def test_gspo_sequence_ratio_value_and_gradient():
    logp0, old, _ = _data(2)
    seq_adv = torch.tensor([1.0, -0.5, 0.7, -2.0], dtype=torch.float64)
    m = MASK.double()
    logp = logp0.clone().requires_grad_()
    loss, met = policy_loss(logp, old, seq_adv, MASK, ratio_level="sequence", aggregation="sequence_mean",
                            clip_low=0.3, clip_high=0.3)
    loss.backward()
    # GSPO: s_i = exp(mean_t (logp - old)) with full gradient, one clipped term per sequence.
    ref = logp0.clone().requires_grad_()
    s = torch.exp(((ref - old) * m).sum(-1) / m.sum(-1))
    manual = torch.maximum(-seq_adv * s, -seq_adv * s.clamp(0.7, 1.3)).mean()
    manual.backward()
    torch.testing.assert_close(loss, manual)
    torch.testing.assert_close(logp.grad, ref.grad * m)
    s_d = s.detach()
    tok_s = (s_d.unsqueeze(-1) * m).sum() / m.sum()
    assert met["ratio_mean"] == pytest.approx(tok_s.item())
    # [B, T] advantages broadcast identically to [B]
    loss2, _ = policy_loss(logp0, old, seq_adv.unsqueeze(-1).expand(4, 6), MASK, ratio_level="sequence",
                           aggregation="sequence_mean", clip_low=0.3, clip_high=0.3)
    torch.testing.assert_close(loss2, loss.detach())


def test_gspo_clipped_sequence_zero_grad():
    old = torch.zeros(1, 3, dtype=torch.float64)
    logp = torch.tensor([[0.5, 0.4, 0.6]], dtype=torch.float64, requires_grad=True)  # s = e^0.5 > 1.2
    loss, met = policy_loss(logp, old, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 3),
                            ratio_level="sequence")
    loss.backward()
    assert (logp.grad == 0).all()
    assert met["clip_frac_high"] == 1.0


@pytest.mark.parametrize("agg", ["token_mean", "sequence_mean", "sequence_sum_norm"])
def test_two_ranks_match_one_rank(agg):
    logp0, old, adv = _data(3)
    # Rank 0 holds 1 sequence (5 tokens), rank 1 holds 3 (2 + 6 + 3 tokens): unequal counts.
    # Rank 0 also pads to its own length (5), as a real micro-batch would.
    splits = [(slice(0, 1), slice(0, 5)), (slice(1, 4), slice(0, 6))]
    denom = {"token_mean": MASK.sum().double(), "sequence_mean": 4.0, "sequence_sum_norm": 4 * 6}[agg]
    full = logp0.clone().requires_grad_()
    corr = torch.full((4, 6), 0.7, dtype=torch.float64)
    loss_full, _ = policy_loss(full, old, adv, MASK, aggregation=agg, correction=corr)
    loss_full.backward()
    grad, total = torch.zeros_like(logp0), 0.0
    for sl in splits:
        part = logp0[sl].clone().requires_grad_()
        loss, _ = policy_loss(part, old[sl], adv[sl], MASK[sl], aggregation=agg,
                              correction=torch.full_like(part, 0.7), denominator=denom)
        loss.backward()
        grad[sl] += part.grad
        total += loss.item()
    torch.testing.assert_close(grad, full.grad)
    assert total == pytest.approx(loss_full.item(), rel=1e-12)


def test_sequence_sum_norm_constant():
    logp, old, adv = _data(4)
    loss, _ = policy_loss(logp, old, adv, MASK, aggregation="sequence_sum_norm", max_tokens=100)
    total = _ref_policy(logp.tolist(), old.tolist(), adv.tolist(), MASK.tolist(), 0.2, 0.2, "sequence_sum_norm",
                        max_tokens=1) * 4 * 1
    assert loss.item() == pytest.approx(total / (4 * 100), rel=1e-12)
    loss_t, _ = policy_loss(logp, old, adv, MASK, aggregation="sequence_sum_norm")
    assert loss_t.item() == pytest.approx(total / (4 * 6), rel=1e-12)


def test_sequence_mean_ignores_empty_rows_and_bad_args():
    logp, old, adv = _data(5)
    m = MASK.clone()
    m[1] = 0
    loss, _ = policy_loss(logp, old, adv, m, aggregation="sequence_mean")
    keep = [0, 2, 3]
    want, _ = policy_loss(logp[keep], old[keep], adv[keep], m[keep], aggregation="sequence_mean")
    torch.testing.assert_close(loss, want)
    with pytest.raises(ValueError, match="token, sequence"):
        policy_loss(logp, old, adv, m, ratio_level="segment")
    with pytest.raises(ValueError, match="sequence_sum_norm"):
        policy_loss(logp, old, adv, m, aggregation="sum")


def test_masked_helpers():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert masked_sum(x, m).item() == 7.0
    assert masked_mean(x, m).item() == pytest.approx(7 / 3)
    assert masked_mean(x, m, denominator=7.0).item() == pytest.approx(1.0)
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0


def test_value_loss():
    v = torch.tensor([[1.0, 0.0, 0.5, 9.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.5, 0.0]], dtype=torch.float64)
    ret = torch.tensor([[2.0, -1.0, 0.0, 0.0]], dtype=torch.float64)
    m = torch.tensor([[1, 1, 1, 0]])
    loss, met = value_loss(v, old, ret, m, clip=0.2)
    # tok0: (1-2)^2=1 vs (0.7-2)^2=1.69 -> 1.69 (clipped); tok1: 1 vs (0.3+1)^2=1.69 -> 1.69; tok2: 0.25 vs 0.25
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.69 + 0.25) / 3)
    assert met["value_clip_frac"] == pytest.approx(2 / 3)
    assert met["value_mean"] == pytest.approx(0.5)
    loss.backward()
    torch.testing.assert_close(v.grad, torch.tensor([[0.0, 0.0, 0.5 / 3, 0.0]], dtype=torch.float64))
    loss_nc, _ = value_loss(v, old, ret, m, clip=None, denominator=10.0)
    assert loss_nc.item() == pytest.approx(0.5 * (1 + 1 + 0.25) / 10)


def test_value_loss_matches_loop():
    g = torch.Generator().manual_seed(6)
    v, old, ret = (torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(3))
    loss, _ = value_loss(v, old, ret, MASK, clip=0.3)
    tot, n = 0.0, 0
    for i in range(4):
        for t in range(6):
            if MASK[i, t]:
                vc = old[i, t].item() + min(max(v[i, t].item() - old[i, t].item(), -0.3), 0.3)
                tot += 0.5 * max((v[i, t].item() - ret[i, t].item()) ** 2, (vc - ret[i, t].item()) ** 2)
                n += 1
    assert loss.item() == pytest.approx(tot / n, rel=1e-12)


def test_entropy():
    logits = torch.zeros(2, 3, 8)
    h, met = entropy(logits, torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert h.item() == pytest.approx(math.log(8), rel=1e-6)
    assert met["entropy"] == pytest.approx(math.log(8), rel=1e-6)
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64) * 3
    h = entropy_from_logits(logits)
    assert h.shape == (2, 3) and h.dtype == torch.float64
    for i in range(2):
        for t in range(3):
            z = [math.exp(x) for x in logits[i, t].tolist()]
            p = [x / sum(z) for x in z]
            assert h[i, t].item() == pytest.approx(-sum(q * math.log(q) for q in p), rel=1e-10)
    assert entropy_from_logits(torch.zeros(1, 1, 4, dtype=torch.bfloat16)).dtype == torch.float32


def test_kl_loss():
    logp, ref, _ = _data(8)
    logp.requires_grad_()
    loss, met = kl_loss(logp, ref, MASK)
    k3 = kl_penalty(logp.detach(), ref, "k3")
    want = (k3 * MASK).sum() / MASK.sum()
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    assert met["kl"] == pytest.approx(want.item(), rel=1e-12)
    loss_d, met_d = kl_loss(logp, ref, MASK, estimator="k1", denominator=100.0)
    assert loss_d.item() == pytest.approx(((logp - ref) * MASK).sum().item() / 100, rel=1e-12)
    assert met_d["kl"] == pytest.approx(((logp - ref) * MASK).sum().item() / MASK.sum().item(), rel=1e-12)
    loss.backward()
    assert logp.grad is not None


def _dual_clip_reference(logp, old, adv, mask, cl, ch, c):
    """Dual-clip PPO per token in float64 Python floats, token-mean aggregated."""
    total, n = 0.0, 0
    for i in range(len(logp)):
        for t in range(len(logp[0])):
            if not mask[i][t]:
                continue
            r = math.exp(logp[i][t] - old[i][t])
            a = adv[i][t]
            loss = max(-a * r, -a * min(max(r, 1 - cl), 1 + ch))
            if a < 0:
                loss = min(loss, -a * c)
            total += loss
            n += 1
    return total / n


def test_dual_clip_matches_a_float64_reference_and_caps_negative_advantages():
    logp, old, adv = _data(seed=3)
    logp = logp + torch.where(adv < 0, 1.5, 0.0)  # ratios well above c where the advantage is negative
    loss, metrics = policy_loss(logp, old, adv, MASK, clip_ratio_c=3.0, aggregation="token_mean")
    expected = _dual_clip_reference(logp.tolist(), old.tolist(), adv.tolist(), MASK.tolist(), 0.2, 0.2, 3.0)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    plain, _ = policy_loss(logp, old, adv, MASK, aggregation="token_mean")
    assert loss.item() < plain.item() and metrics["clip_frac_dual"] > 0
    # Where the cap binds the token gets no gradient; elsewhere dual clip changes nothing.
    x = logp.clone().requires_grad_(True)
    policy_loss(x, old, adv, MASK, clip_ratio_c=3.0, aggregation="token_mean")[0].backward()
    capped = (adv < 0) & (torch.exp(logp - old) > 3.0) & MASK.bool()
    assert capped.any() and torch.all(x.grad[capped] == 0)
    off, off_metrics = policy_loss(*_data(seed=1), MASK, clip_ratio_c=None)
    assert "clip_frac_dual" not in off_metrics


def test_aggregate_loss_by_hand():
    from rlhf_cluster.algorithms.losses import aggregate_loss

    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert aggregate_loss(per_token, m, "token_mean").item() == pytest.approx(7 / 3)
    assert aggregate_loss(per_token, m, "token_mean", denominator=7.0).item() == pytest.approx(1.0)
    # Per-row means 1.5 and 4 over the two non-empty rows; the empty third row does not dilute it.
    assert aggregate_loss(per_token, m, "sequence_mean").item() == pytest.approx(2.75)
    assert aggregate_loss(per_token, m, "sequence_sum_norm").item() == pytest.approx(7 / 9)  # B x T
    assert aggregate_loss(per_token, m, "sequence_sum_norm", max_tokens=7).item() == pytest.approx(7 / 21)
