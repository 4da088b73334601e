"""cispo_loss and dro_loss (rlhf_cluster/algorithms/losses.py) as project losses: masked `[B, T]`
tensors under every aggregation, against a per-token loop, with the gradients each one promises."""

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf_cluster.algorithms.losses import AGGREGATIONS, cispo_loss, dro_loss, policy_loss

MASK = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]])


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 2
    logp = old + torch.randn(4, 6, generator=g, dtype=torch.float64) * 0.4
    adv = torch.randn(4, 6, generator=g, dtype=torch.float64)
    return logp, old, adv


def _aggregate(per_token, mask, agg):
    """The project's aggregations written as loops over python floats."""
    rows = [[v for v, m in zip(r, mr) if m] for r, mr in zip(per_token, mask)]
    if agg == "token_mean":
        return sum(map(sum, rows)) / max(sum(map(len, rows)), 1)
    if agg == "sequence_mean":
        means = [sum(r) / len(r) for r in rows if r]
        return sum(means) / max(len(means), 1)
    return sum(map(sum, rows)) / (len(per_token) * len(per_token[0]))


def _cispo_ref(logp, old, adv, cl, ch):
    return [
        [-min(max(math.exp(lp - o), 1 - cl), 1 + ch) * lp * a for lp, o, a in zip(*row)]
        for row in zip(logp.tolist(), old.tolist(), adv.tolist())
    ]


def _dro_ref(logp, old, adv, beta):
    return [
        [-(lp * a - 0.5 * beta * (lp - o) ** 2) for lp, o, a in zip(*row)]
        for row in zip(logp.tolist(), old.tolist(), adv.tolist())
    ]


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_cispo_matches_loop(agg):
    logp, old, adv = _data()
    loss, _ = cispo_loss(logp, old, adv, MASK, clip_low=0.2, clip_high=0.28, aggregation=agg)
    assert loss.item() == pytest.approx(_aggregate(_cispo_ref(logp, old, adv, 0.2, 0.28), MASK.tolist(), agg))


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_dro_matches_loop(agg):
    logp, old, adv = _data(1)
    loss, _ = dro_loss(logp, old, adv, MASK, beta=0.3, aggregation=agg)
    assert loss.item() == pytest.approx(_aggregate(_dro_ref(logp, old, adv, 0.3), MASK.tolist(), agg))


def test_cispo_gradient_is_clamped_weight_times_advantage():
    """Token mean: d/dlogp = -clip(r) A / n on every valid token, clipped ones included (where PPO's
    gradient is 0), and nothing flows into old_logprobs."""
    logp, old, adv = _data(2)
    logp.requires_grad_(True)
    old.requires_grad_(True)
    loss, m = cispo_loss(logp, old, adv, MASK, clip_low=0.1, clip_high=0.1)
    loss.backward()
    r = torch.exp(logp.detach() - old.detach())
    want = -r.clamp(0.9, 1.1) * adv * MASK / MASK.sum()
    assert_close(logp.grad, want)
    assert old.grad is None
    outside = ((r < 0.9) | (r > 1.1)) & MASK.bool()
    assert outside.any() and (logp.grad[outside] != 0).all()
    assert m["clip_frac"].item() == pytest.approx(outside.sum().item() / MASK.sum().item())

    logp.grad = None
    policy_loss(logp, old, adv, MASK, clip_low=0.1, clip_high=0.1)[0].backward()
    assert (logp.grad[outside] == 0).any()  # PPO drops some of what CISPO keeps


def test_dro_gradient_pulls_toward_old_even_without_advantage():
    logp, old, _ = _data(3)
    logp.requires_grad_(True)
    adv = torch.zeros(4)  # [B] advantages, broadcast
    loss, m = dro_loss(logp, old, adv, MASK, beta=0.2, aggregation="token_mean")
    loss.backward()
    assert_close(logp.grad, 0.2 * (logp.detach() - old) * MASK / MASK.sum())
    assert m["sq_log_ratio"].item() == pytest.approx(
        (((logp.detach() - old) ** 2) * MASK).sum().item() / MASK.sum().item()
    )


def test_beta_zero_dro_is_reinforce_and_broadcast_advantages_match():
    logp, old, adv = _data(4)
    seq_adv = adv[:, 0]
    reinforce = -(logp * seq_adv[:, None] * MASK).sum() / MASK.sum()
    assert_close(dro_loss(logp, old, seq_adv, MASK, beta=0.0)[0], reinforce)
    assert_close(
        cispo_loss(logp, old, seq_adv, MASK, aggregation="sequence_mean")[0],
        cispo_loss(logp, old, seq_adv[:, None].expand(4, 6), MASK, aggregation="sequence_mean")[0],
    )


@pytest.mark.parametrize("fn", [cispo_loss, dro_loss])
def test_global_denominator_splits_over_micro_batches(fn):
    """Two micro-batches with the global token count add up to the whole batch's token mean."""
    logp, old, adv = _data(5)
    whole, _ = fn(logp, old, adv, MASK)
    n = MASK.sum()
    parts = sum(fn(logp[s], old[s], adv[s], MASK[s], denominator=n)[0] for s in (slice(0, 2), slice(2, 4)))
    assert_close(parts, whole)


@pytest.mark.parametrize("fn", [cispo_loss, dro_loss])
def test_all_masked_is_zero_and_unknown_aggregation_refused(fn):
    logp, old, adv = _data(6)
    empty = torch.zeros_like(MASK)
    for agg in AGGREGATIONS:
        assert fn(logp, old, adv, empty, aggregation=agg)[0].item() == 0.0
    with pytest.raises(ValueError, match="unknown aggregation"):
        fn(logp, old, adv, MASK, aggregation="token_sum")
