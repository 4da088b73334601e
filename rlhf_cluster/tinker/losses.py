"""The Tinker SDK's built-in losses, computed through this project's own loss functions.

Tinker's losses are sums over every position of every datum: no mean and no mask, positions being
switched off only by zero `weights` or `advantages`. Notation: `lp` is the learner's log-prob of
`target_tokens` at each position, `q` the sampler's (`loss_fn_inputs["logprobs"]`), `A` the
`advantages`, `r = exp(lp - q)`, `sg` stop-gradient:

- `cross_entropy` (`weights`): `-(lp * weights).sum()`, through `masked_sum` with the weights as the
  mask (any real weights: the cookbook normalises them, client-side custom losses send negative ones);
- `importance_sampling`: `-(r * A).sum()`, through `policy_loss` with the clip opened on both sides;
- `ppo`: `-min(r A, clip(r, lo, hi) A).sum()`, through `policy_loss` with `clip_low = 1 - lo`,
  `clip_high = hi - 1` (Tinker's thresholds are on the ratio, ours are distances from 1);
- `cispo`: `-(sg(clip(r, lo, hi)) * lp * A).sum()`, through `cispo_loss`;
- `dro`: `-(lp * A - 0.5 * beta * (lp - q)**2).sum()`, through `dro_loss`.

The datums are right-padded to `[B, T]` with a 0/1 mask, and every project loss is called with
`aggregation="sequence_sum_norm"` and `denominator=1`, which is the plain masked sum.

Defaults of `loss_fn_config`: `ppo` takes `clip_low_threshold` 0.8 and `clip_high_threshold` 1.2
(Tinker's documented PPO defaults); `cispo` takes 0.0 and 4.0 (Tinker's CISPO page: a one-sided clip,
no lower bound; tinker-docs.thinkingmachines.ai/tinker/losses/cispo); `dro` takes `beta` 0.05
(its docs give no default; 0.05 is the value their example passes). Inputs a loss does not read
(the cookbook's `mask`, say) are ignored.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from ..algorithms.losses import cispo_loss, dro_loss, masked_sum, policy_loss

SERVED_LOSSES: tuple[str, ...] = ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro")

# Names the SDK's `LossFnType` allows that this server does not compute: `gspo` and `stable_reinforce`
# need inputs and provenance we do not take, and `custom` is a server-side custom loss.
UNSERVED_SDK_LOSSES: tuple[str, ...] = ("gspo", "stable_reinforce", "custom")

RL_INPUTS = ("logprobs", "advantages")
CLIP_DEFAULTS = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}


@dataclass(frozen=True)
class LossSpec:
    """What one built-in loss reads: its `loss_fn_inputs` besides `target_tokens` (which every loss
    needs, since it picks the log-probs), and the `loss_fn_config` keys it accepts with defaults."""

    inputs: tuple[str, ...]
    config: Mapping[str, float]


LOSS_SPECS: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(("weights",), {}),
    "importance_sampling": LossSpec(RL_INPUTS, {}),
    "ppo": LossSpec(RL_INPUTS, CLIP_DEFAULTS),
    "cispo": LossSpec(RL_INPUTS, {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}),
    "dro": LossSpec(RL_INPUTS, {"beta": 0.05}),
}


class LossError(ValueError):
    """A forward_backward request the losses refuse, found before any compute. `field` names what is
    wrong (`loss_fn`, an input's name, a config key); `datum` is the datum's index where one is at fault."""

    def __init__(self, message: str, field: str, datum: int | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.datum = datum


def loss_spec(name: str) -> LossSpec:
    """The spec of a served loss; a `LossError` on `loss_fn` naming the served ones otherwise."""
    if name in LOSS_SPECS:
        return LOSS_SPECS[name]
    served = ", ".join(SERVED_LOSSES)
    if name in UNSERVED_SDK_LOSSES:
        raise LossError(f"loss_fn {name!r} is not served by this server; served: {served}", "loss_fn")
    near = difflib.get_close_matches(name, SERVED_LOSSES, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise LossError(f"unknown loss_fn {name!r}{hint}; served: {served}", "loss_fn")


def resolve_config(name: str, config: Mapping[str, Any] | None) -> dict[str, float]:
    """The loss's full config: the given keys over its defaults. Refuses a key it does not accept, a
    value that is not a number, and thresholds in the wrong order."""
    spec = loss_spec(name)
    out = dict(spec.config)
    for key, value in (config or {}).items():
        if key not in spec.config:
            accepted = ", ".join(spec.config) or "none"
            raise LossError(f"loss_fn_config key {key!r} is not accepted by {name}; accepted: {accepted}", key)
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise LossError(f"loss_fn_config {key!r} must be a number, got {value!r}", key)
        out[key] = float(value)
    if "clip_low_threshold" in out and out["clip_low_threshold"] > out["clip_high_threshold"]:
        raise LossError(
            f"clip_low_threshold {out['clip_low_threshold']} exceeds clip_high_threshold {out['clip_high_threshold']}",
            "clip_low_threshold",
        )
    if "beta" in out and not math.isfinite(out["beta"]):
        raise LossError(f"loss_fn_config 'beta' must be finite, got {out['beta']}", "beta")
    return out


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else (len(x),)


def _check_inputs(names: Sequence[str], inputs_list: Sequence[Mapping[str, Any]], lengths: Sequence[int]) -> None:
    """Each datum has every input in `names`, one-dimensional and of its datum's length."""
    for i, (inputs, n) in enumerate(zip(inputs_list, lengths)):
        for key in names:
            if key not in inputs:
                raise LossError(f"datum {i} lacks loss_fn_inputs {key!r}", key, i)
            shape = _shape(inputs[key])
            if shape != (n,):
                raise LossError(f"datum {i}: loss_fn_inputs {key!r} has shape {list(shape)}, want [{n}]", key, i)


def check_loss(
    name: str,
    config: Mapping[str, Any] | None,
    inputs_list: Sequence[Mapping[str, Any]],
    lengths: Sequence[int] | None = None,
) -> dict[str, float]:
    """Validate a forward_backward request before any compute and return the resolved config.

    `inputs_list[i]` is datum i's `loss_fn_inputs` (arrays or tensors); `lengths[i]` its token count
    (default: the length of its `target_tokens`). Raises `LossError`.
    """
    spec = loss_spec(name)
    resolved = resolve_config(name, config)
    if not inputs_list:
        raise LossError("forward_backward needs at least one datum", "data")
    if lengths is None:
        for i, x in enumerate(inputs_list):
            if "target_tokens" not in x:
                raise LossError(f"datum {i} lacks loss_fn_inputs 'target_tokens'", "target_tokens", i)
        lengths = [(_shape(x["target_tokens"]) or (0,))[0] for x in inputs_list]
    elif len(lengths) != len(inputs_list):
        raise LossError(f"{len(lengths)} datum lengths for {len(inputs_list)} datums", "data")
    _check_inputs(("target_tokens", *spec.inputs), inputs_list, lengths)
    return resolved


def _pad(rows: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Right-pad 1-D rows with zeros to `[B, T]`, in `like`'s dtype and device."""
    return pad_sequence([r.to(dtype=like.dtype, device=like.device) for r in rows], batch_first=True)


def builtin_loss(
    name: str,
    logprobs: list[torch.Tensor],
    inputs: list[dict[str, torch.Tensor]],
    config: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Tinker's built-in loss `name` over a batch of datums, summed, with its metrics.

    `logprobs[i]` (`[N_i]`, with grad) is the learner's log-prob of datum i's `target_tokens`;
    `inputs[i]` the datum's loss inputs as tensors. Metrics carry the SDK's reduction suffix:
    `loss:sum`; for importance_sampling, ppo and cispo also `approx_kl:mean` and (ppo, cispo)
    `clip_fraction:mean`, both over the positions with a non-zero advantage.
    """
    spec = loss_spec(name)
    cfg = resolve_config(name, config)
    if not logprobs or len(logprobs) != len(inputs):
        raise LossError(f"{len(logprobs)} log-prob rows for {len(inputs)} datums", "data")
    _check_inputs(spec.inputs, inputs, [int(lp.shape[0]) for lp in logprobs])
    lp = pad_sequence(list(logprobs), batch_first=True)
    if name == "cross_entropy":
        loss = masked_sum(-lp, _pad([x["weights"] for x in inputs], lp))
        return loss, {"loss:sum": float(loss.detach())}
    mask = _pad([torch.ones(int(x.shape[0])) for x in logprobs], lp)
    q = _pad([x["logprobs"] for x in inputs], lp)
    adv = _pad([x["advantages"] for x in inputs], lp)
    summed: dict[str, Any] = {"aggregation": "sequence_sum_norm", "denominator": 1}
    if name == "dro":
        loss, _ = dro_loss(lp, q, adv, mask, beta=cfg["beta"], **summed)
        return loss, {"loss:sum": float(loss.detach())}
    if name == "importance_sampling":
        clip_low = clip_high = math.inf
    else:
        clip_low, clip_high = 1.0 - cfg["clip_low_threshold"], cfg["clip_high_threshold"] - 1.0
    # The policy-gradient losses are 0 where A = 0 (the prompt, whose `q` is a placeholder), so
    # masking those positions changes neither value nor gradient and keeps the metrics to the
    # positions the loss acts on.
    acting = mask * (adv != 0).to(mask.dtype)
    fn = cispo_loss if name == "cispo" else policy_loss
    loss, m = fn(lp, q, adv, acting, clip_low=clip_low, clip_high=clip_high, **summed)
    metrics = {"loss:sum": float(loss.detach()), "approx_kl:mean": float(m["approx_kl"])}
    if name != "importance_sampling":
        metrics["clip_fraction:mean"] = float(m["clip_frac"])
    return loss, metrics
