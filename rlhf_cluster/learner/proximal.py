"""π_prox of one learner step: the current weights' log-probs before any update (the PPO ratio's
denominator) and the importance-correction weights they give against the rollout's log-probs.

With one epoch of one mini-batch (one update, however many micro-batches accumulate into it),
every training forward runs on exactly those weights, so its detached log-probs are π_prox for its
rows and the separate no-grad forward is skipped: π_prox is then filled pass by pass. The
correction weights are per row (token, sequence or geometric level), so each micro-batch takes
its own rows'; the batch's mismatch diagnostics are computed once every row is in.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from rlhf_cluster.learner.micro_batches import Rows
from rlhf_cluster.learner.objective import RLObjective


class ProximalPolicy:
    """π_prox and the correction weights of one step's batch.

    `frozen`: π_prox from a no-grad forward before the step, or None when the step is one update
    and each training pass fills its own rows (`rows_of`)."""

    def __init__(
        self, objective: RLObjective, rollout_logprobs: torch.Tensor, mask: torch.Tensor, frozen: torch.Tensor | None
    ):
        self.objective, self.rollout_logprobs, self.mask = objective, rollout_logprobs, mask
        self.filled_per_pass = frozen is None
        self.metrics: dict[str, torch.Tensor] | None
        if frozen is None:
            self.logprobs = torch.zeros_like(rollout_logprobs, dtype=torch.float32)
            self.correction = torch.zeros_like(self.logprobs) if objective.cfg.correction.enabled else None
            self.metrics = None
        else:
            self.logprobs = frozen
            self.correction, self.metrics = objective.correction_weights(frozen, rollout_logprobs, mask)

    def rows_of(self, rows: Rows, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """π_prox and the correction weights (None when correction is off) of `rows`, whose training
        forward gave `logprobs`: with one update, these are π_prox for the rows, recorded here."""
        if self.filled_per_pass:
            self.logprobs[rows] = logprobs.detach()
            weights, _ = self.objective.correction_weights(
                self.logprobs[rows], self.rollout_logprobs[rows], self.mask[rows]
            )
            if self.correction is not None and weights is not None:  # both exist where correction is enabled
                self.correction[rows] = weights
        return self.logprobs[rows], None if self.correction is None else self.correction[rows]

    def correction_metrics(self) -> dict[str, torch.Tensor]:
        """The batch's mismatch diagnostics: with one update, once every row's π_prox is in (by the
        last pass)."""
        if self.metrics is None:
            _, self.metrics = self.objective.correction_weights(self.logprobs, self.rollout_logprobs, self.mask)
        return self.metrics


def global_counts(mask: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """[mini-batch, (tokens, sequences)]: every rank's valid tokens and non-empty sequences of each
    mini-batch (rows `bounds[k]`..`bounds[k+1]` of `mask`), the loss denominators of every rank.
    Summed on the device (float64: exact), returned as float32 (exact below 2^24 tokens)."""
    counts = torch.stack(
        [
            torch.stack([mask[lo:hi].sum(), (mask[lo:hi].sum(-1) > 0).sum()]).double()
            for lo, hi in zip(bounds[:-1], bounds[1:])
        ]
    )
    dist.all_reduce(counts)
    return counts.float()
