"""A policy step's metrics over its micro-batches and ranks, reduced on the device and read once
(issue 35: the step waits for the device only at its optimizer updates); a critic warm-up step's,
where the policy runs no pass, from the batch as it is (`held_policy_metrics`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from rlhf_cluster.algorithms.kl import kl_penalty
from rlhf_cluster.models.flops import FlopsShape, flops_of_sums

if TYPE_CHECKING:
    from rlhf_cluster.experience.records import TrainBatch


def on_device(value: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """A metric as a float64 0-dim tensor on `device`, without waiting for it: a number is a fill
    kernel's argument (`torch.as_tensor(v, device=cuda)` would copy it from the host and sync the
    stream, once per metric per micro-batch); a tensor (a device one; `checked_result` turns a user's
    host tensors into numbers) is cast where it is, or moved non-blocking."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float64, non_blocking=True)
    return torch.full((), float(value), dtype=torch.float64, device=device)


class StepMetrics:
    """A policy step's metrics across micro-batches and ranks, reduced on the device and read once.

    Token means are averaged weighted by tokens, maxima take the max, and the ESS is recomputed
    from global sums (an average of per-rank ESS would be wrong). `device_values` builds one flat
    tensor (sums all-reduced, maxima all-reduced by max) that the last update reads with its own
    decision; `read` turns the floats back into named metrics.

    Given the model's `flops` shape and the real tokens of each row (`lengths` [B]), the step's
    training FLOPs both ways (`models.flops`: dense 6·N·tokens, and with attention per sequence)
    over every real micro-batch pass of every epoch, summed over ranks: `learner/flops_dense`,
    `learner/flops_with_attention`.

    `weight`: each rank's share of the sums over the ranks, 1/N where a sequence-parallel group's N
    ranks run the same rows (`sequence_groups`): its tokens, loss and FLOPs then count once, and
    the means and ratios, sums over sums, are the same."""

    def __init__(
        self,
        device: torch.device,
        mask: torch.Tensor,
        flops: FlopsShape | None = None,
        lengths: torch.Tensor | None = None,
        weight: float = 1.0,
    ):
        self.device, self.mask, self.weight = device, mask, weight
        self.flops = flops
        self.lengths = None if flops is None or lengths is None else lengths.to(device).double()
        self.mean_keys: list[str] = []
        self.from_micro: set[str] = set()
        self.max_keys: list[str] = []
        self.iterations = 0

    def device_values(self, passes, correction: torch.Tensor | None, corr_metrics: dict) -> torch.Tensor:
        mask, dev = self.mask, self.device
        sums: dict[str, torch.Tensor] = {}
        tokens_seen = torch.zeros((), dtype=torch.float64, device=dev)
        sequence_sums = torch.zeros(2, dtype=torch.float64, device=dev)  # Σ s, Σ s² over the passes' rows
        for rows, metrics in passes.micro_metrics:
            if self.lengths is not None:
                seq = self.lengths[rows]
                sequence_sums = sequence_sums + torch.stack([seq.sum(), (seq * seq).sum()])
            local_tokens = mask[rows].sum().double()
            for k, v in metrics.items():
                v = on_device(v, dev)
                sums[k] = (
                    torch.maximum(sums[k], v)
                    if k.endswith("_max") and k in sums
                    else (v if k.endswith("_max") else sums.get(k, 0.0) + v * local_tokens)
                )
            tokens_seen = tokens_seen + local_tokens
        local_tok = mask.sum().double()
        means = {k: v for k, v in sums.items() if not k.endswith("_max")}
        self.from_micro = set(means)
        means.update(
            {
                k: on_device(v, dev) * local_tok
                for k, v in corr_metrics.items()
                if not k.endswith("_max") and k != "correction/ess"
            }
        )
        maxima = {k: on_device(v, dev) for k, v in {**corr_metrics, **sums}.items() if k.endswith("_max")}
        self.mean_keys, self.max_keys = sorted(means), sorted(maxima)
        w = correction if correction is not None else torch.ones_like(mask)
        losses = torch.stack(passes.loss_tensors).sum()  # this rank's share of every update's loss
        summed = torch.stack(
            [means[k] for k in self.mean_keys]
            + [tokens_seen, local_tok, losses, (w * mask).sum().double(), (w * w * mask).sum().double()]
            + list(sequence_sums)
        )
        if self.weight != 1.0:
            summed = summed * self.weight
        dist.all_reduce(summed)
        peaks = torch.stack([maxima[k] for k in self.max_keys]) if self.max_keys else summed.new_zeros(0)
        if self.max_keys:
            dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        self.iterations = len(passes.loss_tensors)
        return torch.cat([summed, peaks])

    def read(self, values: list[float]) -> dict[str, float]:
        n = len(self.mean_keys)
        summed, peaks = values[: n + 7], values[n + 7 :]
        total_seen, total_tok, loss_sum, w_sum, w2_sum, seq_tokens, seq_squares = summed[n:]
        out = {
            k: summed[i] / max(total_seen if k in self.from_micro else total_tok, 1.0)
            for i, k in enumerate(self.mean_keys)
        }
        out.update(zip(self.max_keys, peaks))
        out["correction/ess"] = w_sum**2 / (total_tok * w2_sum) if w2_sum > 0 else 0.0
        out["learner/tokens"] = total_tok
        # Each rank's loss is its share of the global-denominator loss: the sum is the loss.
        out["policy/loss"] = loss_sum / max(self.iterations, 1)
        if self.lengths is not None and self.flops is not None:
            counted = flops_of_sums(self.flops, seq_tokens, seq_squares)
            out["learner/flops_dense"], out["learner/flops_with_attention"] = counted
        return out


def held_policy_metrics(local: TrainBatch, device: torch.device) -> dict[str, float]:
    """Collective over the policy's ranks: a critic warm-up step's metrics (`critic.freeze_policy_steps`:
    the policy runs no pass) over every rank's share. `policy/kl` is the k3 KL to the reference of
    the rollouts' own log-probs (the unchanged policy's, as its engines scored them; a trained step
    reports it of the learner's), a token mean over the tokens in the loss; no learner time."""
    mask = local.response_mask.double()
    kl = kl_penalty(local.rollout_logprobs.double(), local.ref_logprobs.double(), "k3")
    sums = torch.stack([(kl * mask).sum(), mask.sum()]).to(device)
    dist.all_reduce(sums)
    kl_sum, tokens = sums.tolist()
    return {"policy/kl": kl_sum / max(tokens, 1.0), "learner/step_seconds": 0.0}
