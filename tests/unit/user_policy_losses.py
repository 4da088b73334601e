"""Policy losses as a user writes them for `algorithm.loss.function` (test_custom_policy_loss.py
names them `tests.unit.user_policy_losses:<name>`), and ones that break the contract."""

from __future__ import annotations

import numpy as np
import torch

from rlhf_cluster.algorithms.losses import aggregate_loss, masked_mean, policy_loss


def ppo_again(logprobs, old_logprobs, advantages, mask, **keywords):
    """The built-in PPO loss through the user's door: the objective's loss only if every argument arrives."""
    return policy_loss(logprobs, old_logprobs, advantages, mask, **keywords)


def reinforce(logprobs, old_logprobs, advantages, mask, *, clip_low, clip_high, aggregation, correction, denominator,
              max_tokens):
    """REINFORCE, no ratio and no clip: `-A logp` per token, aggregated as the job's loss is."""
    per_token = -advantages.detach() * logprobs
    loss = aggregate_loss(per_token, mask, aggregation, denominator, max_tokens, correction=correction)
    with torch.no_grad():
        metrics = {"logprob_mean": masked_mean(logprobs, mask), "calls": 1}
    return loss, metrics


def _reinforce_loss(logprobs, advantages, mask):
    return masked_mean(-advantages * logprobs, mask)


def per_token_loss(logprobs, old_logprobs, advantages, mask, **keywords):
    return -advantages * logprobs, {}  # not aggregated


def loss_alone(logprobs, old_logprobs, advantages, mask, **keywords):
    return _reinforce_loss(logprobs, advantages, mask)  # no metrics


def metrics_as_list(logprobs, old_logprobs, advantages, mask, **keywords):
    return _reinforce_loss(logprobs, advantages, mask), [1.0]


def vector_metric(logprobs, old_logprobs, advantages, mask, **keywords):
    return _reinforce_loss(logprobs, advantages, mask), {"per_row": logprobs.detach().mean(-1)}


def metric_named_kl(logprobs, old_logprobs, advantages, mask, **keywords):
    return _reinforce_loss(logprobs, advantages, mask), {"kl": torch.tensor(0.0)}


def metric_named_updated(logprobs, old_logprobs, advantages, mask, **keywords):
    return _reinforce_loss(logprobs, advantages, mask), {"updated": 1.0}  # the trainer's policy/updated


def names_by_rows(logprobs, old_logprobs, advantages, mask, **keywords):
    """A metric only some micro-batches report (here: those of more than one row): the ranks'
    all-reduce of the step's metrics by name would misalign."""
    metrics = {"rows": float(logprobs.shape[0])} if logprobs.shape[0] > 1 else {}
    return _reinforce_loss(logprobs, advantages, mask), metrics


def numpy_metrics(logprobs, old_logprobs, advantages, mask, **keywords):
    """Metrics as numpy-based code computes them: numpy scalars."""
    return _reinforce_loss(logprobs, advantages, mask), {"share": np.float32(0.5), "rows": np.int64(logprobs.shape[0])}


def detached_loss(logprobs, old_logprobs, advantages, mask, **keywords):
    return _reinforce_loss(logprobs.detach(), advantages, mask), {}


def too_few_arguments(logprobs, old_logprobs):
    return logprobs.sum(), {}


NOT_A_FUNCTION = 3
