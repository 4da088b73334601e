"""The RL objective the learner minimises, assembled from `rlhf_cluster.algorithms` by config.

The trainer knows nothing about the algorithm: it hands this object log-probs, entropies and
the batch, with the global denominators, and gets back a scalar loss and metrics.
"""

from __future__ import annotations

import torch

from rlhf_cluster.algorithms import importance_weights, kl_loss, kl_penalty, masked_mean, policy_loss
from rlhf_cluster.algorithms.losses import cispo_loss
from rlhf_cluster.config import AlgorithmConfig


class RLObjective:
    """Clipped policy loss x importance weights, + KL to the reference, - entropy bonus."""

    def __init__(self, cfg: AlgorithmConfig, max_tokens: int):
        self.cfg = cfg
        self.max_tokens = max_tokens

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
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and its metrics (0-dim device tensors: read by the learner once per step)."""
        lc = self.cfg.loss
        # CISPO: the same clip band bounds a detached weight on every token's log-prob (`algorithm.loss.mode`).
        pg, metrics = (cispo_loss if lc.mode == "cispo" else policy_loss)(
            logprobs,
            old_logprobs,
            advantages,
            mask,
            clip_low=lc.clip_low,
            clip_high=lc.clip_high,
            aggregation=lc.aggregation,
            correction=correction,
            denominator=denominator,
            max_tokens=self.max_tokens,
            **({} if lc.mode == "cispo" else {"clip_ratio_c": lc.clip_ratio_c, "ratio_level": lc.ratio_level}),
        )
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
