"""Reward shaping and batch filters that need no model (DAPO overlong handling, length penalty, ensembles)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from rlhf_cluster.algorithms.advantages import _group_index, _group_stats


def _as_float(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(torch.promote_types(x.dtype, torch.float32))
    return torch.tensor(x, dtype=torch.float32)


def overlong_penalty(lengths, max_len: int, buffer_len: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO soft overlong punishment: 0 up to ``max_len - buffer_len``, linear to ``-penalty`` at ``max_len``.

    Lengths beyond ``max_len`` get ``-penalty``. ``buffer_len <= 0`` degenerates to a hard step.
    """
    lengths = _as_float(lengths)
    if buffer_len <= 0:
        return torch.where(lengths > max_len, -float(penalty), 0.0).to(lengths.dtype)
    frac = ((lengths - (max_len - buffer_len)) / buffer_len).clamp(0.0, 1.0)
    return -penalty * frac


def length_penalty(lengths, target: int, coef: float) -> torch.Tensor:
    """``-coef * max(0, len - target)``, to subtract length exploitation from the reward."""
    return -coef * (_as_float(lengths) - target).clamp_min(0.0)


def ensemble(scores, how: str = "mean") -> torch.Tensor:
    """Combine ``K`` reward-model scores ``[K, B]`` (or a list of ``[B]``) by ``mean`` or pessimistic ``min``."""
    if not isinstance(scores, torch.Tensor):
        scores = torch.stack([_as_float(s) for s in scores])
    if how == "mean":
        return scores.mean(0)
    if how == "min":
        return scores.min(0).values
    raise ValueError(f"unknown ensemble {how!r}; allowed: mean, min")


def overlong_filter_mask(finish_reasons: Sequence[str]) -> torch.Tensor:
    """DAPO overlong filtering: True where the sample stays in the loss (it was not cut at max length)."""
    return torch.tensor([r != "length" for r in finish_reasons], dtype=torch.bool)


def dynamic_sampling_filter(
    rewards: torch.Tensor, group_ids: Sequence[Hashable] | torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """DAPO dynamic sampling: drop groups whose rewards are all equal (they carry no group-relative signal).

    Singleton groups count as all-equal and are dropped, matching their zero group advantage.
    """
    rewards = _as_float(rewards)
    idx, n = _group_index(group_ids, rewards.device)
    _, _, drop = _group_stats(rewards, idx, n)
    return ~drop[idx], {"groups_dropped": float(drop.sum()), "groups_kept": float(n - drop.sum())}
