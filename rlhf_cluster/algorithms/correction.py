"""Train/inference mismatch correction (TIS / MIS) between the learner and the rollout engine.

With ``delta_t = log pi_prox - log pi_roll`` the weight corrects for sampling from ``pi_roll``
while the PPO ratio is taken against ``pi_prox`` (see DESIGN.md, "Importance correction").
"""

from __future__ import annotations

import torch

from .losses import masked_max

LEVELS = ("token", "sequence", "geometric")
MODES = ("truncate", "mask")


@torch.no_grad()
def importance_weights(
    prox_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str = "token",
    mode: str = "truncate",
    cap: float | None = 2.0,
    lower: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Detached per-token weights ``[B, T]`` (zero on padding) and mismatch diagnostics.

    ``level``: ``token`` ``rho_t = exp(delta_t)``; ``sequence`` ``rho = exp(sum_t delta_t)``;
    ``geometric`` ``g = exp(mean_t delta_t)``, the last two broadcast over the sequence.
    ``mode``: ``truncate`` (TIS) ``w = clamp(rho, lower, cap)``, a token's weight raised to ``lower``
    rather than dropped (slime's ``--tis-clip-low``, TRL's ``clip_min``); ``mask`` (MIS) ``w = rho``
    if ``lower <= rho <= cap`` else 0 (``lower=None``: no lower bound; ``cap=None``: no upper bound).
    ``delta`` and the per-sequence sums are clamped to ±20 so ``exp`` cannot overflow.
    Metrics: ``mismatch_k1``/``mismatch_k3`` estimate KL(pi_roll || pi_prox) from the rollout
    samples, ``frac_truncated`` (weights lowered to ``cap``) and, when ``lower`` is set,
    ``frac_truncated_low`` (weights raised to ``lower``), or ``frac_masked``, ``ess = (sum w)^2 / (N sum w^2)``,
    ``weight_mean``, ``weight_max`` (all over valid tokens), as 0-dim tensors on the inputs'
    device: nothing here waits for the device (the learner reads a step's metrics at once).
    """
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; allowed: {', '.join(LEVELS)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    mb = mask.bool()
    m = mb.to(prox_logprobs.dtype)
    # where() rather than multiply: padded rollout log-probs may be -inf/NaN.
    delta = torch.where(mb, (prox_logprobs.detach() - rollout_logprobs).clamp(-20.0, 20.0), 0.0)
    rho = torch.exp(_log_rho(delta, m, level))
    n = m.sum().clamp_min(1)
    w, metrics = _bounded(rho, mb, n, mode, cap, lower)
    w = torch.where(mb, w, 0.0)

    sw, sw2 = w.sum(), w.square().sum()
    metrics.update(
        mismatch_k1=(-delta * m).sum() / n,
        mismatch_k3=((torch.exp(delta) - 1.0 - delta) * m).sum() / n,
        ess=torch.where(sw2 > 0, sw.square() / (n * sw2).clamp_min(torch.finfo(sw2.dtype).tiny), 0.0),
        weight_mean=sw / n,
        weight_max=masked_max(w, mb),
    )
    return w, metrics


def _log_rho(delta: torch.Tensor, m: torch.Tensor, level: str) -> torch.Tensor:
    """log rho ``[B, T]`` at ``level`` from the clamped per-token ``delta`` (0 on padding)."""
    if level == "token":
        return delta
    if level == "sequence":
        return delta.sum(-1).clamp(-20.0, 20.0).unsqueeze(-1).expand_as(delta)
    # A mean of clamped deltas is already within ±20; clamping the sum would bias long sequences.
    return (delta.sum(-1) / m.sum(-1).clamp_min(1)).unsqueeze(-1).expand_as(delta)


def _bounded(
    rho: torch.Tensor, mb: torch.Tensor, n: torch.Tensor, mode: str, cap: float | None, lower: float | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weight ``rho`` clamped to [``lower``, ``cap``] (TIS) or masked outside it (MIS), not yet
    zeroed on padding, and the fractions of the ``n`` valid tokens (``mb``) it changed."""
    metrics: dict[str, torch.Tensor] = {}
    if mode == "truncate":
        w = rho if cap is None and lower is None else rho.clamp(min=lower, max=cap)
        over = rho > cap if cap is not None else torch.zeros_like(mb)
        metrics["frac_truncated"] = (over & mb).sum() / n
        if lower is not None:
            metrics["frac_truncated_low"] = ((rho < lower) & mb).sum() / n
    else:
        keep = torch.ones_like(mb)
        if cap is not None:
            keep &= rho <= cap
        if lower is not None:
            keep &= rho >= lower
        w = torch.where(keep, rho, 0.0)
        metrics["frac_masked"] = (~keep & mb).sum() / n
    return w, metrics
