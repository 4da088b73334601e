"""Tinker's built-in losses (rlhf_cluster/tinker/losses.py): each one equals the formula Tinker's docs
write (value and gradient) and this project's own loss function on the same batch; bad requests are
refused naming the field at fault."""

import math

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.testing import assert_close

from rlhf_cluster.algorithms.losses import cispo_loss, dro_loss, masked_sum, policy_loss
from rlhf_cluster.tinker.losses import (
    LOSS_SPECS,
    SERVED_LOSSES,
    LossError,
    builtin_loss,
    check_loss,
)

LENGTHS = (5, 1, 9, 3)
SERVED = "cross_entropy, importance_sampling, ppo, cispo, dro"


def _batch(seed=0):
    """Datums of different lengths: sampler log-probs `q`, the learner's `lp` near them (ratios on both
    sides of 0.8 and 1.2), advantages with zeros (a prompt), fractional and negative weights."""
    g = torch.Generator().manual_seed(seed)
    lps, inputs = [], []
    for n in LENGTHS:
        q = -torch.rand(n, generator=g) * 3
        lp = q + torch.randn(n, generator=g) * 0.4
        adv = torch.randn(n, generator=g)
        adv[: n // 3] = 0.0
        weights = torch.randn(n, generator=g) * 0.7
        weights[0] = 0.0
        lps.append(lp)
        inputs.append({"target_tokens": torch.arange(n), "logprobs": q, "advantages": adv, "weights": weights})
    return lps, inputs


def _grad(fn, lps):
    """`fn`'s value on fresh leaves of `lps` and each leaf's gradient."""
    leaves = [lp.detach().clone().requires_grad_(True) for lp in lps]
    value = fn(leaves)
    value.backward()
    return value.detach(), [leaf.grad for leaf in leaves]


def _literal(name, cfg):
    """The loss exactly as Tinker's docs write it, per datum then summed."""
    lo, hi, beta = cfg.get("clip_low_threshold"), cfg.get("clip_high_threshold"), cfg.get("beta")

    def one(lp, x):
        q, a = x["logprobs"], x["advantages"]
        if name == "cross_entropy":
            return -(lp * x["weights"]).sum()
        r = torch.exp(lp - q)
        if name == "importance_sampling":
            return -(r * a).sum()
        if name == "ppo":
            return -torch.minimum(r * a, torch.clamp(r, lo, hi) * a).sum()
        if name == "cispo":
            return -(torch.clamp(r, lo, hi).detach() * lp * a).sum()
        return -(lp * a - 0.5 * beta * (lp - q) ** 2).sum()

    return lambda inputs: lambda lps: sum(one(lp, x) for lp, x in zip(lps, inputs))


def _project(name, cfg):
    """The project's own function called directly on the padded batch with a padding mask."""

    def run(inputs):
        def fn(lps):
            lp = pad_sequence(lps, batch_first=True)
            mask = pad_sequence([torch.ones(len(x)) for x in lps], batch_first=True)
            if name == "cross_entropy":
                return masked_sum(-lp, pad_sequence([x["weights"] for x in inputs], batch_first=True))
            q = pad_sequence([x["logprobs"] for x in inputs], batch_first=True)
            a = pad_sequence([x["advantages"] for x in inputs], batch_first=True)
            kw = {"aggregation": "sequence_sum_norm", "denominator": 1}
            if name == "dro":
                return dro_loss(lp, q, a, mask, beta=cfg["beta"], **kw)[0]
            if name == "importance_sampling":
                return policy_loss(lp, q, a, mask, clip_low=math.inf, clip_high=math.inf, **kw)[0]
            f = cispo_loss if name == "cispo" else policy_loss
            eps_low, eps_high = 1 - cfg["clip_low_threshold"], cfg["clip_high_threshold"] - 1
            return f(lp, q, a, mask, clip_low=eps_low, clip_high=eps_high, **kw)[0]

        return fn

    return run


CASES = [
    ("cross_entropy", {}),
    ("importance_sampling", {}),
    ("ppo", {}),
    ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05}),
    ("cispo", {}),
    ("cispo", {"clip_high_threshold": 1.5}),
    ("dro", {}),
    ("dro", {"beta": 0.3}),
]


@pytest.mark.parametrize("name,config", CASES)
def test_builtin_equals_formula_and_project_function(name, config):
    lps, inputs = _batch()
    cfg = {**LOSS_SPECS[name].config, **config}
    metrics = {}

    def served(leaves):
        loss, m = builtin_loss(name, leaves, inputs, config)
        metrics.update(m)
        return loss

    value, grads = _grad(served, lps)
    for reference in (_literal(name, cfg)(inputs), _project(name, cfg)(inputs)):
        want, want_grads = _grad(reference, lps)
        assert_close(value, want)
        for got, exp in zip(grads, want_grads):
            assert_close(got, exp)
    assert metrics["loss:sum"] == pytest.approx(value.item(), rel=1e-6)
    assert all(k.split(":")[1] in ("sum", "mean", "min", "max") for k in metrics)
    assert sum(g.abs().sum() for g in grads) > 0


def test_defaults_are_documented_values():
    assert SERVED_LOSSES == ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro")
    assert LOSS_SPECS["ppo"].config == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert LOSS_SPECS["cispo"].config == {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}  # one-sided
    assert LOSS_SPECS["dro"].config == {"beta": 0.05}
    assert LOSS_SPECS["cross_entropy"].inputs == ("weights",)
    # The defaults are what builtin_loss uses when the request gives no config.
    lps, inputs = _batch(1)
    for name in ("ppo", "cispo", "dro"):
        got = builtin_loss(name, lps, inputs, None)[0]
        assert_close(got, builtin_loss(name, lps, inputs, LOSS_SPECS[name].config)[0])
    assert not torch.isclose(builtin_loss("dro", lps, inputs, {"beta": 0.5})[0], builtin_loss("dro", lps, inputs)[0])


def test_ppo_clips_outside_the_thresholds_and_cispo_does_not_drop_gradients():
    ratios = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.0])
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, 2.0])
    q = torch.full((5,), -1.0)
    inputs = [{"logprobs": q, "advantages": adv}]
    lp = [q + torch.log(ratios)]

    _, metrics = builtin_loss("ppo", lp, inputs, {})
    _, (grad,) = _grad(lambda x: builtin_loss("ppo", x, inputs, {})[0], lp)
    # r = 1.5 > 1.2 with A > 0 and r = 0.5 < 0.8 with A < 0 are clipped: no gradient.
    assert_close(grad, torch.tensor([0.0, 1.5, 0.0, -0.5, -2.0]))
    assert metrics["clip_fraction:mean"] == pytest.approx(2 / 5)

    band = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    _, metrics = builtin_loss("cispo", lp, inputs, band)
    _, (grad,) = _grad(lambda x: builtin_loss("cispo", x, inputs, band)[0], lp)
    # CISPO keeps every token's gradient, with the weight clamped to [0.8, 1.2].
    assert_close(grad, torch.tensor([-1.2, 1.2, 0.8, -0.8, -2.0]))
    assert metrics["clip_fraction:mean"] == pytest.approx(4 / 5)
    # Its default band, [0, 4], clamps none of these ratios: the plain importance-weighted gradient.
    _, (grad,) = _grad(lambda x: builtin_loss("cispo", x, inputs, {})[0], lp)
    assert_close(grad, -adv * ratios)

    # importance_sampling never clips.
    _, (grad,) = _grad(lambda x: builtin_loss("importance_sampling", x, inputs, {})[0], lp)
    assert_close(grad, -adv * ratios)


def test_dro_pulls_prompt_positions_too():
    """Tinker's DRO penalises (lp - q)^2 where A = 0 as well, as written."""
    lp = [torch.tensor([-2.0, -0.5])]
    inputs = [{"logprobs": torch.tensor([0.0, -0.5]), "advantages": torch.tensor([0.0, 0.0])}]
    value, (grad,) = _grad(lambda x: builtin_loss("dro", x, inputs, {"beta": 0.1})[0], lp)
    assert value.item() == pytest.approx(0.5 * 0.1 * 4.0)
    assert_close(grad, torch.tensor([0.1 * -2.0, 0.0]))


def _raises(field, fn, *args, match=None, **kwargs):
    with pytest.raises(LossError, match=match) as err:
        fn(*args, **kwargs)
    assert err.value.field == field
    assert isinstance(err.value, ValueError)
    return err.value


def test_unknown_and_unserved_losses_are_named():
    lps, inputs = _batch()
    err = _raises("loss_fn", builtin_loss, "ppoo", lps, inputs, {})
    assert "unknown loss_fn 'ppoo'" in str(err) and "'ppo'" in str(err) and SERVED in str(err)
    _raises("loss_fn", check_loss, "cross_entropi", {}, inputs, match="did you mean 'cross_entropy'")
    _raises("loss_fn", check_loss, "zzz", {}, inputs, match=f"unknown loss_fn 'zzz'; served: {SERVED}")
    for name in ("gspo", "stable_reinforce", "custom"):
        err = _raises("loss_fn", check_loss, name, {}, inputs)
        assert str(err) == f"loss_fn {name!r} is not served by this server; served: {SERVED}"


def test_missing_input_and_wrong_length_name_the_input():
    lps, inputs = _batch()
    bad = [dict(x) for x in inputs]
    del bad[2]["advantages"]
    assert _raises("advantages", builtin_loss, "ppo", lps, bad, {}).datum == 2
    assert _raises("advantages", check_loss, "ppo", {}, bad).datum == 2
    _raises("weights", check_loss, "cross_entropy", {}, [{"target_tokens": np.zeros(3)}])
    _raises("target_tokens", check_loss, "cross_entropy", {}, [{"weights": np.zeros(3)}])

    short = [dict(x) for x in inputs]
    short[0]["logprobs"] = short[0]["logprobs"][:-1]
    _raises("logprobs", builtin_loss, "importance_sampling", lps, short, {}, match=r"datum 0.*want \[5\]")
    _raises("logprobs", check_loss, "dro", {}, short)
    # Against the datum's token count, target_tokens included.
    _raises("target_tokens", check_loss, "cross_entropy", {}, inputs, lengths=[5, 1, 8, 3])
    _raises("weights", builtin_loss, "cross_entropy", lps, [{"weights": torch.ones(2, 2)}] + inputs[1:], {})
    _raises("data", builtin_loss, "ppo", lps[:2], inputs, {})
    _raises("data", check_loss, "ppo", {}, [])


def test_config_keys_and_values_are_checked():
    lps, inputs = _batch()
    err = _raises("beta", check_loss, "ppo", {"beta": 0.1}, inputs)
    assert "clip_low_threshold, clip_high_threshold" in str(err)
    _raises("clip_low_threshold", check_loss, "cross_entropy", {"clip_low_threshold": 0.8}, inputs)
    _raises("clip_high_threshold", builtin_loss, "importance_sampling", lps, inputs, {"clip_high_threshold": 1.2})
    _raises("beta", check_loss, "dro", {"beta": "0.1"}, inputs, match="must be a number")
    _raises("beta", check_loss, "dro", {"beta": float("nan")}, inputs)
    _raises("clip_low_threshold", check_loss, "ppo", {"clip_low_threshold": 1.3}, inputs)


def test_check_loss_returns_resolved_config_on_numpy_inputs():
    inputs = [
        {"target_tokens": np.arange(4), "logprobs": np.zeros(4, np.float32), "advantages": np.ones(4, np.float32)},
        {"target_tokens": np.arange(2), "logprobs": np.zeros(2, np.float32), "advantages": np.ones(2, np.float32)},
    ]
    assert check_loss("ppo", None, inputs) == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert check_loss("cispo", {"clip_low_threshold": 0.5}, inputs, lengths=[4, 2]) == {
        "clip_low_threshold": 0.5,
        "clip_high_threshold": 4.0,  # CISPO's own default
    }
    assert check_loss("dro", {}, inputs) == {"beta": 0.05}
    # Inputs a loss does not read (the cookbook's `mask`) are ignored.
    assert check_loss("importance_sampling", {}, [{**x, "mask": np.ones(9)} for x in inputs]) == {}
