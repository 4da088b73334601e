"""The RL objective the learner minimises, assembled from `rlhf_cluster.algorithms` by config.

The trainer knows nothing about the algorithm: it hands this object log-probs, entropies and
the batch, with the global denominators, and gets back a scalar loss and metrics.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch

from rlhf_cluster.algorithms import importance_weights, kl_loss, kl_penalty, masked_mean, policy_loss
from rlhf_cluster.algorithms.losses import cispo_loss
from rlhf_cluster.config import AlgorithmConfig
from rlhf_cluster.user_code import import_spec

FIELD = "algorithm.loss.function"
# How the learner calls a user's policy loss: the built-in losses' own signature (`policy_loss`, `cispo_loss`).
CONTRACT = (
    "fn(logprobs, old_logprobs, advantages, mask, *, clip_low, clip_high, aggregation, correction, denominator, "
    "max_tokens) -> (loss, metrics)"
)
KEYWORDS = ("clip_low", "clip_high", "aggregation", "correction", "denominator", "max_tokens")
# Names reported under policy/ by the objective (and `policy/updated` by the trainer, beside a critic):
# a user's metric of that name would be overwritten.
RESERVED_METRICS = ("loss", "kl", "kl_loss_term", "entropy", "updated")


def load_policy_loss(spec: str) -> Callable:
    """The user's policy loss `algorithm.loss.function` names, imported (`import_spec`) and checked
    to be callable as `CONTRACT` says. Errors are ValueErrors that name the field (preflight shows them)."""
    where = f"{FIELD}={spec!r}"
    fn = import_spec(spec, FIELD, example="my_losses:reinforce")
    if not callable(fn):
        raise ValueError(f"{where}: {spec.strip().partition(':')[2]!r} is a {type(fn).__name__}, not a function")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn  # no introspectable signature (a builtin): the first call decides
    try:
        signature.bind(None, None, None, None, **dict.fromkeys(KEYWORDS))
    except TypeError as exc:
        raise ValueError(
            f"{where}: the learner calls it as {CONTRACT}, which its signature {signature} refuses: {exc}"
        ) from None
    return fn


def _what(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return f"{type(value).__name__} {text[:80] + '...' if len(text) > 80 else text}"


def checked_result(
    spec: str, out: object, needs_grad: bool, device: torch.device
) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    """A user's policy loss's return as the objective uses it: a 0-dim loss tensor (with a gradient
    when `needs_grad`) and its metrics, a dict of 0-dim tensors (detached here) or real numbers
    (numpy's too). Anything else is a ValueError naming `algorithm.loss.function` and what came back.

    Nothing here waits for `device`: a 0-dim tensor on another device than the log-probs' that is
    on the host becomes a float (read on the host; `StepMetrics` writes floats to the device as a
    fill's argument, never with a synchronous copy)."""
    where = f"{FIELD}={spec!r} returned"
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(f"{where} {_what(out)}; expected a pair (loss, metrics): {CONTRACT}")
    loss, metrics = out
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError(
            f"{where} a loss of {_what(loss)}; expected a 0-dim tensor (aggregate the per-token loss, e.g. with "
            "rlhf_cluster.algorithms.losses.aggregate_loss)"
        )
    if needs_grad and not loss.requires_grad:
        raise ValueError(f"{where} a loss with no gradient to the log-probs (detached?); expected one built from them")
    if not isinstance(metrics, dict):
        raise ValueError(f"{where} metrics of {_what(metrics)}; expected a dict of name -> 0-dim tensor or number")
    out_metrics: dict[str, torch.Tensor | float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or name in RESERVED_METRICS:
            reserved = ", ".join(RESERVED_METRICS)
            raise ValueError(f"{where} a metric named {name!r}; expected a str other than {reserved}")
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            on_host = value.device.type == "cpu" and value.device != device
            out_metrics[name] = float(value) if on_host else value.detach()
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            out_metrics[name] = float(value)
        else:
            raise ValueError(f"{where} metric {name!r} as {_what(value)}; expected a 0-dim tensor or a number")
    return loss, out_metrics


def same_names(spec: str, first: tuple[str, ...], metrics: Mapping[str, object]) -> None:
    """Refuses metrics whose names differ from the first call's (`first`, sorted) on this rank:
    `StepMetrics` reduces them over micro-batches and all-reduces them over ranks by name, so a
    name missing on one call would misalign the ranks' tensors (a hang or mixed-up values)."""
    names = tuple(sorted(metrics))
    if names != first:
        raise ValueError(
            f"{FIELD}={spec!r} returned metrics named {list(names)}, its first call on this rank {list(first)}: "
            "expected the same names on every call and rank (the learner reduces them across micro-batches and "
            "ranks by name); return every name each time, e.g. 0 for a micro-batch with no valid tokens"
        )


class RLObjective:
    """The built-in clipped policy loss x the TIS/MIS correction weights, or the user's
    (`algorithm.loss.function`), which gets those weights as `correction` and applies them itself
    (nothing applies them around it); + KL to the reference, - entropy bonus.

    `user_loss=False` (the critic's ranks, which compute no policy loss): the user's function is
    not imported."""

    def __init__(self, cfg: AlgorithmConfig, max_tokens: int, *, user_loss: bool = True):
        self.cfg = cfg
        self.max_tokens = max_tokens
        # A user's policy loss, imported once per rank (`algorithm.loss.function`); None: the built-in one.
        self.custom = None if cfg.loss.function is None or not user_loss else load_policy_loss(cfg.loss.function)
        self.metric_names: tuple[str, ...] | None = None  # the user's function's, from its first call

    def correction_weights(
        self, prox_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """TIS/MIS weights for the step (None when correction is off) and mismatch diagnostics."""
        c = self.cfg.correction
        weights, metrics = importance_weights(
            prox_logprobs, rollout_logprobs, mask, level=c.level, mode=c.mode, cap=c.cap, lower=c.lower
        )
        return (weights if c.enabled else None), {f"correction/{k}": v for k, v in metrics.items()}

    def denominator(self, global_tokens, global_sequences):
        """The global normaliser for the configured aggregation (shared by all ranks); floats or
        device scalars alike."""
        agg = self.cfg.loss.aggregation
        if agg == "token_mean":
            return global_tokens
        if agg == "sequence_mean":
            return global_sequences
        return global_sequences * self.max_tokens

    def loss(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        ref_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        correction: torch.Tensor | None,
        entropy: torch.Tensor | None,
        *,
        kl_coef: float,
        denominator,
        token_denominator,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """The loss and its metrics (0-dim device tensors, or a user's loss's numbers: read by the
        learner once per step)."""
        pg, metrics = self.policy_term(logprobs, old_logprobs, advantages, mask, correction, denominator)
        total = pg
        kl_cfg = self.cfg.kl
        metrics = {f"policy/{k}": v for k, v in metrics.items()}
        if kl_cfg.placement == "loss" and kl_coef > 0:
            kl_value, kl_metrics = kl_loss(
                logprobs, ref_logprobs, mask, kl_cfg.estimator, token_denominator, kl_cfg.k3_log_ratio_clamp
            )
            total = total + kl_coef * kl_value
            metrics["policy/kl_loss_term"] = kl_metrics["kl"]
        # The reported KL is always k3 (unbiased and >= 0), whatever estimator the loss uses,
        # so runs with different settings stay comparable.
        with torch.no_grad():
            metrics["policy/kl"] = masked_mean(kl_penalty(logprobs.detach(), ref_logprobs, "k3"), mask)
        if entropy is not None:
            ent = masked_mean(entropy, mask, token_denominator)
            if self.cfg.entropy_coef > 0:
                total = total - self.cfg.entropy_coef * ent
            metrics["policy/entropy"] = masked_mean(entropy.detach(), mask)
        return total, metrics

    def policy_term(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        correction: torch.Tensor | None,
        denominator,
    ) -> tuple[torch.Tensor, Mapping[str, torch.Tensor | float]]:
        """The policy loss alone and its metrics: the user's function, CISPO or PPO's clipped surrogate."""
        lc = self.cfg.loss
        args = (logprobs, old_logprobs, advantages, mask)
        shared: dict[str, Any] = {
            "clip_low": lc.clip_low,
            "clip_high": lc.clip_high,
            "aggregation": lc.aggregation,
            "correction": correction,
            "denominator": denominator,
            "max_tokens": self.max_tokens,
        }
        if self.custom is not None:
            needs_grad = torch.is_grad_enabled() and logprobs.requires_grad
            spec = lc.function or ""
            loss, metrics = checked_result(spec, self.custom(*args, **shared), needs_grad, logprobs.device)
            if self.metric_names is None:
                self.metric_names = tuple(sorted(metrics))
            same_names(spec, self.metric_names, metrics)
            return loss, metrics
        if lc.mode == "cispo":  # the same clip band bounds a detached weight on every token's log-prob
            return cispo_loss(*args, **shared)
        return policy_loss(*args, **shared, clip_ratio_c=lc.clip_ratio_c, ratio_level=lc.ratio_level)
