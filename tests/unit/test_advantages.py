import math

import pytest
import torch

from rlhf_cluster.algorithms import (
    broadcast_to_tokens,
    gae,
    group_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)


def _masks():
    return torch.tensor(
        [
            [1, 1, 1, 1, 0, 0],  # right padding
            [0, 0, 1, 1, 1, 1],  # left padding
            [1, 1, 0, 0, 1, 0],  # hole (masked tool output)
            [1, 0, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )


def _ref_gae(r, v, m, gamma, lam):
    adv = [[0.0] * len(row) for row in r]
    for i in range(len(r)):
        idx = [t for t in range(len(r[i])) if m[i][t]]
        a_next, v_next = 0.0, 0.0
        for t in reversed(idx):
            delta = r[i][t] + gamma * v_next - v[i][t]
            a_next = delta + gamma * lam * a_next
            adv[i][t] = a_next
            v_next = v[i][t]
    return adv


def test_gae_hand():
    r = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    v = torch.tensor([[0.5, 0.5, 0.5, 9.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.45125, 0.475, 0.5, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.95125, 0.975, 1.0, 0.0]]))
    adv1, ret1 = gae(r, v, m, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret1, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))


def test_gae_matches_loop():
    g = torch.Generator().manual_seed(1)
    m = _masks()
    r = torch.randn(4, 6, generator=g, dtype=torch.float64)
    v = torch.randn(4, 6, generator=g, dtype=torch.float64)
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8)]:
        adv, ret = gae(r, v, m, gamma, lam)
        want = torch.tensor(_ref_gae(r.tolist(), v.tolist(), m.tolist(), gamma, lam), dtype=torch.float64)
        torch.testing.assert_close(adv, want)
        torch.testing.assert_close(ret, torch.where(m, want + v, 0.0))
        assert not adv.requires_grad


def _ref_group(r, ids, scale, eps):
    out = []
    for i, ri in enumerate(r):
        grp = [r[j] for j in range(len(r)) if ids[j] == ids[i]]
        if len(grp) < 2 or max(grp) == min(grp):
            out.append(0.0)
            continue
        mean = sum(grp) / len(grp)
        a = ri - mean
        if scale == "std":
            a /= math.sqrt(sum((x - mean) ** 2 for x in grp) / (len(grp) - 1)) + eps
        out.append(a)
    return out


def test_group_advantages_hand():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.3])
    adv, met = group_advantages(r, ["a", "a", "b", "b", "c"], eps=0.0)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(adv, torch.tensor([s, -s, 0.0, 0.0, 0.0]))
    assert met["zero_signal_group_frac"] == pytest.approx(2 / 3)
    assert met["reward_mean"] == pytest.approx(r.mean().item())
    assert met["reward_std"] == pytest.approx(r.std(correction=0).item())
    adv, _ = group_advantages(r, torch.tensor([7, 7, 3, 3, 1]), scale="none")
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, 0.0, 0.0, 0.0]))


def test_constant_group_exactly_zero():
    r = torch.full((4,), 0.1)
    for fn in (lambda: group_advantages(r, ["g"] * 4), lambda: group_advantages(r, ["g"] * 4, scale="none"),
               lambda: rloo_advantages(r, ["g"] * 4)):
        adv, met = fn()
        assert (adv == 0).all()
        assert met["zero_signal_group_frac"] == 1.0


def test_group_advantages_matches_loop():
    g = torch.Generator().manual_seed(2)
    r = torch.randn(24, generator=g, dtype=torch.float64)
    ids = [f"p{int(x)}" for x in torch.randint(0, 5, (24,), generator=g)]
    for scale in ("std", "none"):
        adv, _ = group_advantages(r, ids, scale=scale)
        torch.testing.assert_close(adv, torch.tensor(_ref_group(r.tolist(), ids, scale, 1e-6), dtype=torch.float64))
    with pytest.raises(ValueError, match="std, none"):
        group_advantages(r, ids, scale="max")


def test_rloo():
    adv, _ = rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 5.0]), ["a", "a", "a", "b"])
    torch.testing.assert_close(adv, torch.tensor([1.0, -0.5, -0.5, 0.0]))
    g = torch.Generator().manual_seed(3)
    r = torch.randn(20, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 4, (20,), generator=g)
    adv, _ = rloo_advantages(r, ids)
    for i in range(20):
        others = [r[j].item() for j in range(20) if ids[j] == ids[i] and j != i]
        want = r[i].item() - sum(others) / len(others) if others else 0.0
        assert adv[i].item() == pytest.approx(want, abs=1e-12)


def test_reinforce_pp_matches_loop():
    g = torch.Generator().manual_seed(4)
    m = _masks()
    r = torch.randn(4, 6, generator=g, dtype=torch.float64)
    gamma = 0.9
    adv, met = reinforce_pp_advantages(r, m, gamma)
    rl, ml = r.tolist(), m.tolist()
    ret = [[0.0] * 6 for _ in range(4)]
    vals = []
    for i in range(4):
        run = 0.0
        for t in reversed(range(6)):
            if ml[i][t]:
                run = rl[i][t] + gamma * run
                ret[i][t] = run
                vals.append(run)
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((x - mean) ** 2 for x in vals) / len(vals))
    want = [[(ret[i][t] - mean) / (std + 1e-8) if ml[i][t] else 0.0 for t in range(6)] for i in range(4)]
    torch.testing.assert_close(adv, torch.tensor(want, dtype=torch.float64))
    assert met["return_mean"] == pytest.approx(mean)
    assert met["return_std"] == pytest.approx(std)


def test_reinforce_pp_hand():
    r = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    m = torch.tensor([[1, 1], [1, 0]])
    adv, _ = reinforce_pp_advantages(r, m)  # returns 1, 1, 0: mean 2/3, std sqrt(2)/3
    s = math.sqrt(2) / 3
    torch.testing.assert_close(adv, torch.tensor([[(1 / 3) / s, (1 / 3) / s], [(-2 / 3) / s, 0.0]]))


def test_broadcast_to_tokens():
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    torch.testing.assert_close(out, torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))
