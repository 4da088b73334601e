"""Policy (PPO / GRPO / DAPO / Dr.GRPO / GSPO, CISPO, DRO), value, entropy, KL, SFT and Bradley-Terry losses.

Tensors are ``[B, T]`` over response tokens with a 0/1 ``mask``. Every loss returns
``(scalar, metrics)``; metrics are over the local valid tokens, computed without grad: 0-dim
tensors for the RL losses (`policy_loss`, `kl_loss`: the learner reads a whole step's at once,
never waiting for the device inside it), python floats for the others.
``denominator`` lets data-parallel ranks and micro-batches normalise by one global count, so that
summing their gradients equals the gradient of the whole batch.
"""

from __future__ import annotations

import torch

from .kl import kl_penalty

RATIO_LEVELS = ("token", "sequence")
AGGREGATIONS = ("token_mean", "sequence_mean", "sequence_sum_norm")


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over valid positions."""
    return (x * mask.to(x.dtype)).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor, denominator=None) -> torch.Tensor:
    """Sum over valid positions divided by ``denominator`` (default: local valid count, at least 1).

    The floor of 1 keeps an all-padding micro-batch at 0 instead of NaN.
    """
    if denominator is None:
        denominator = mask.to(x.dtype).sum().clamp_min(1)
    return masked_sum(x, mask) / denominator


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max of ``x`` over valid positions (0 when none), a 0-dim tensor: no boolean indexing, which
    would wait for the device to count the valid positions."""
    m = mask.bool()
    return torch.where(m.any(), x.detach().masked_fill(~m, float("-inf")).amax(), 0.0).to(x.dtype)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float | None = None,
    ratio_level: str = "token",
    aggregation: str = "token_mean",
    correction: torch.Tensor | None = None,
    denominator=None,
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate ``max(-A r, -A clip(r, 1-clip_low, 1+clip_high))`` per token, aggregated.

    ``clip_ratio_c`` (dual-clip PPO): where ``A < 0`` the per-token loss is further capped at
    ``-A * clip_ratio_c`` (> 1), bounding the push on a token whose ratio has grown large.

    ``ratio_level="token"``: ``r_t = exp(logp_t - old_t)``. ``"sequence"`` (GSPO): the length-normalised
    sequence ratio ``s = exp(mean_t(logp - old))`` in GSPO-token form ``sg[s] exp(logp_t - sg[logp_t])``,
    so its value is ``s`` on every token while gradients flow per token. ``advantages`` is ``[B]``
    (broadcast) or ``[B, T]``. ``correction`` (TIS/MIS weight, ``[B, T]``) multiplies the clipped loss
    and is detached. Aggregation: ``token_mean`` (sum / valid tokens, DAPO), ``sequence_mean``
    (mean over non-empty sequences of per-sequence token means, GRPO), ``sequence_sum_norm``
    (sum / (B * max_tokens), Dr.GRPO; ``max_tokens`` defaults to T). A given ``denominator``
    replaces the count: global valid tokens, global sequences, or the Dr.GRPO constant respectively.
    """
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"unknown ratio_level {ratio_level!r}; allowed: {', '.join(RATIO_LEVELS)}")
    _check_aggregation(aggregation)
    m = mask.to(logprobs.dtype)
    log_ratio = logprobs - old_logprobs.detach()
    if ratio_level == "sequence":
        seq_log_ratio = (log_ratio * m).sum(-1) / m.sum(-1).clamp_min(1)
        log_ratio = seq_log_ratio.detach().unsqueeze(-1) + logprobs - logprobs.detach()
    ratio = torch.exp(log_ratio)
    adv = _per_token(advantages, logprobs)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high))
    dual = None
    if clip_ratio_c is not None:
        cap = -adv * clip_ratio_c
        dual = (adv < 0) & (pg > cap)
        pg = torch.where(dual, cap, pg)
    if correction is not None:
        pg = pg * correction.detach()

    loss = aggregate_loss(pg, m, aggregation, denominator, max_tokens)
    r = ratio.detach()  # a side of the clip bites where the ratio left the band in the advantage's direction
    low, high = (r < 1.0 - clip_low) & (adv < 0), (r > 1.0 + clip_high) & (adv > 0)
    metrics = _ratio_metrics(ratio, log_ratio, m, low, high, dual)
    return loss, metrics


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; allowed: {', '.join(AGGREGATIONS)}")


def aggregate_loss(
    per_token: torch.Tensor,
    m: torch.Tensor,
    aggregation: str,
    denominator=None,
    max_tokens: int | None = None,
    *,
    correction: torch.Tensor | None = None,
) -> torch.Tensor:
    """A per-token loss ``[B, T]`` over the valid tokens of ``m`` (a 0/1 mask) as one scalar, as
    `policy_loss` aggregates it (``aggregation``, ``denominator`` and ``max_tokens`` as there).

    A user's policy loss (`algorithm.loss.function`) ends with it: given the keywords the learner
    passes, ``correction`` (TIS/MIS weights ``[B, T]`` or None) multiplies the per-token loss,
    detached, and the denominator is the step's global one, so ranks and micro-batches add up."""
    if correction is not None:
        per_token = per_token * correction.detach()
    if aggregation == "token_mean":
        return masked_mean(per_token, m, denominator)
    if aggregation == "sequence_mean":
        n_tok = m.sum(-1)
        per_seq = (per_token * m).sum(-1) / n_tok.clamp_min(1)
        # Fully masked rows (overlong-filtered samples) must not dilute the mean.
        return per_seq.sum() / (denominator if denominator is not None else (n_tok > 0).sum().clamp_min(1))
    if denominator is None:
        denominator = per_token.shape[0] * (max_tokens if max_tokens is not None else per_token.shape[-1])
    return masked_sum(per_token, m) / denominator


@torch.no_grad()
def _ratio_metrics(
    ratio: torch.Tensor,
    log_ratio: torch.Tensor,
    m: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    dual: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """A clipped-ratio loss's metrics (`policy_loss`, `cispo_loss`) over the valid tokens: the share
    its clip bit from below (`low`, a bool ``[B, T]``) and from above (`high`) (and the dual clip,
    where on), the ratio's mean and max, and the k3 estimate of the KL it moved."""
    r, lr = ratio.detach(), log_ratio.detach()
    metrics = {
        "clip_frac_low": masked_mean(low.to(m.dtype), m),
        "clip_frac_high": masked_mean(high.to(m.dtype), m),
        "approx_kl": masked_mean((r - 1.0) - lr, m),
        "ratio_mean": masked_mean(r, m),
        "ratio_max": masked_max(r, m),
    }
    metrics["clip_frac"] = metrics["clip_frac_low"] + metrics["clip_frac_high"]
    if dual is not None:
        metrics["clip_frac_dual"] = masked_mean(dual.to(m.dtype), m)
    return metrics


def cispo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: str = "token_mean",
    correction: torch.Tensor | None = None,
    denominator=None,
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO: ``-sg(clip(r, 1-clip_low, 1+clip_high)) * logp * A`` per token, aggregated.

    Unlike PPO's clip, which zeroes the gradient of a token whose ratio left the band, CISPO clips
    the importance weight itself and keeps every token's REINFORCE gradient ``-w A grad(logp)``, with
    ``w`` the clamped, detached ratio. The value holds ``logp``, not ``r``: only its gradient means
    anything. ``advantages`` is ``[B]`` (broadcast) or ``[B, T]``; ``correction``, ``aggregation``,
    ``denominator`` and ``max_tokens`` as in `policy_loss`. Metrics: the share of valid tokens whose weight was clamped
    from below and from above, the ratio's mean and max, and the k3 estimate of the KL it moved.
    """
    _check_aggregation(aggregation)
    m = mask.to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs).detach()
    ratio = torch.exp(log_ratio)
    weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = -weight * logprobs * _per_token(advantages, logprobs)
    if correction is not None:
        per_token = per_token * correction.detach()
    loss = aggregate_loss(per_token, m, aggregation, denominator, max_tokens)
    metrics = _ratio_metrics(ratio, log_ratio, m, ratio < 1.0 - clip_low, ratio > 1.0 + clip_high)
    return loss, metrics


def dro_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = 0.05,
    aggregation: str = "token_mean",
    denominator=None,
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DRO (direct reward optimisation) as Tinker defines it: ``-(logp * A - beta/2 * (logp - old)^2)``
    per token, aggregated.

    A policy-gradient term plus a quadratic pull of ``logp`` towards the sampler's ``old`` log-probs,
    the pull on every valid token whatever its advantage (a token with ``A = 0`` is still held near
    ``old``). ``beta`` (default 0.05, the value Tinker's docs use; they give no default) weighs the
    pull. ``advantages`` is ``[B]`` or ``[B, T]``; ``aggregation``, ``denominator`` and
    ``max_tokens`` as in `policy_loss`. Metrics: the mean squared log-ratio, the ratio's mean and
    the k3 estimate of the KL.
    """
    _check_aggregation(aggregation)
    m = mask.to(logprobs.dtype)
    diff = logprobs - old_logprobs.detach()
    per_token = -(logprobs * _per_token(advantages, logprobs) - 0.5 * beta * diff.square())
    loss = aggregate_loss(per_token, m, aggregation, denominator, max_tokens)
    with torch.no_grad():
        lr = diff.detach()
        ratio = torch.exp(lr)
        metrics = {
            "sq_log_ratio": masked_mean(lr.square(), m),
            "approx_kl": masked_mean((ratio - 1.0) - lr, m),
            "ratio_mean": masked_mean(ratio, m),
        }
    return loss, metrics


def _per_token(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Detached advantages as ``[B, T]``: a ``[B]`` tensor broadcast over each sequence's tokens."""
    adv = advantages.detach()
    return adv.unsqueeze(-1).expand_as(like) if adv.dim() == 1 else adv


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = 0.2,
    denominator=None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss ``0.5 max((V - R)^2, (V_clip - R)^2)``, ``V_clip = old + clamp(V - old, ±clip)``.

    ``clip=None`` disables clipping. ``value_clip_frac`` counts tokens where the clipped term wins
    (their gradient is zero).
    """
    m = mask.to(values.dtype)
    old, ret = old_values.detach(), returns.detach()
    l1 = (values - ret).square()
    if clip is None:
        per_tok, clipped = 0.5 * l1, torch.zeros_like(l1)
    else:
        v_clip = old + (values - old).clamp(-clip, clip)
        l2 = (v_clip - ret).square()
        per_tok, clipped = 0.5 * torch.maximum(l1, l2), (l2 > l1).to(m.dtype)
    loss = masked_mean(per_tok, m, denominator)
    with torch.no_grad():
        metrics = {"value_clip_frac": masked_mean(clipped, m).item(), "value_mean": masked_mean(values, m).item()}
    return loss, metrics


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy ``[B, T]`` of the softmax over the last dim (at least fp32 for stability)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy(logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean token entropy over valid tokens (differentiable, for an entropy bonus)."""
    h = masked_mean(entropy_from_logits(logits), mask)
    return h, {"entropy": h.item()}


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    estimator: str = "k3",
    denominator=None,
    k3_clamp: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """In-loss KL to the reference (GRPO style): token mean of :func:`kl_penalty`."""
    kl = kl_penalty(logprobs, ref_logprobs, estimator, k3_clamp)
    loss = masked_mean(kl, mask, denominator)
    with torch.no_grad():
        metrics = {"kl": masked_mean(kl.detach(), mask)}
    return loss, metrics


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, denominator=None) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token cross-entropy on labelled positions (``labels == -100`` elsewhere).

    Position ``t`` of ``logits`` predicts ``labels[t + 1]``. The loss is the summed NLL divided by
    ``denominator`` (default: the local count of labelled tokens), so ranks and micro-batches
    sharing one global token count add up to the whole batch's mean.
    """
    targets = labels[:, 1:]
    valid = targets != -100
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    loss = masked_mean(nll, valid, denominator)
    with torch.no_grad():
        tokens = int(valid.sum())
        correct = (logp.argmax(-1) == targets) & valid
        metrics = {
            "nll": masked_mean(nll, valid).item(),
            "tokens": float(tokens),
            "token_accuracy": correct.sum().item() / max(tokens, 1),
        }
    return loss, metrics


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float | None = None, denominator=None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Pairwise reward-model loss ``-log sigmoid(r_chosen - r_rejected - margin)`` summed over pairs
    and divided by ``denominator`` (default: the number of pairs).

    Metrics: ``accuracy`` (share of pairs with ``r_chosen > r_rejected``), ``reward_gap`` (mean
    ``r_chosen - r_rejected``), ``chosen_mean``, ``rejected_mean``.
    """
    gap = chosen - rejected
    shifted = gap - margin if margin is not None else gap
    per_pair = -torch.nn.functional.logsigmoid(shifted)
    if denominator is None:
        denominator = max(per_pair.numel(), 1)
    loss = per_pair.sum() / denominator
    with torch.no_grad():
        metrics = {
            "accuracy": (gap > 0).float().mean().item(),
            "reward_gap": gap.mean().item(),
            "chosen_mean": chosen.mean().item(),
            "rejected_mean": rejected.mean().item(),
        }
    return loss, metrics
