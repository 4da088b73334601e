"""Advantage estimators: GAE (critic), group-relative (GRPO / Dr.GRPO), RLOO and REINFORCE++.

All functions run under ``no_grad``: advantages are targets, never differentiated through.
`ESTIMATORS` is the registry `algorithm.advantage` names: one function per estimator, each with
the same signature (a group's sequence rewards and group ids in, one advantage per sequence and
metrics out).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch

GroupIds = Sequence[Hashable] | torch.Tensor


def _group_index(group_ids: GroupIds, device: torch.device | None = None) -> tuple[torch.Tensor, int]:
    """Map arbitrary group ids to dense indices ``0..G-1`` (first-seen order for lists)."""
    if isinstance(group_ids, torch.Tensor):
        _, idx = torch.unique(group_ids.reshape(-1), return_inverse=True)
        n = int(idx.max()) + 1 if idx.numel() else 0
        return idx.to(device), n
    lookup: dict = {}
    idx = [lookup.setdefault(g, len(lookup)) for g in group_ids]
    return torch.tensor(idx, dtype=torch.long, device=device), len(lookup)


def _group_stats(rewards: torch.Tensor, idx: torch.Tensor, n: int):
    """Per-sample group size, sum and a flag for groups with no signal (constant or singleton)."""
    count = rewards.new_zeros(n).index_add_(0, idx, torch.ones_like(rewards))
    total = rewards.new_zeros(n).index_add_(0, idx, rewards)
    gmax = rewards.new_full((n,), -torch.inf).scatter_reduce(0, idx, rewards, "amax")
    gmin = rewards.new_full((n,), torch.inf).scatter_reduce(0, idx, rewards, "amin")
    # Compare extremes instead of testing std == 0: r - mean is not exactly 0 in floating point.
    dead = (gmax == gmin) | (count < 2)
    return count, total, dead


def _group_metrics(rewards: torch.Tensor, dead: torch.Tensor) -> dict[str, float]:
    return {
        "zero_signal_group_frac": dead.float().mean().item() if dead.numel() else 0.0,
        "reward_mean": rewards.mean().item() if rewards.numel() else 0.0,
        "reward_std": rewards.std(correction=0).item() if rewards.numel() else 0.0,
    }


@torch.no_grad()
def gae(
    token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the valid tokens of each row.

    Masked positions are skipped (not treated as terminal), so left/right padding and masked holes
    inside a response (e.g. tool output) all work; the value after the last valid token is 0.
    Rewards placed on masked positions are ignored. Returns ``(advantages, returns)`` with
    ``returns = advantages + values``, both zero on padding.
    """
    m = mask.bool()
    B, T = values.shape
    adv = torch.zeros_like(values)
    next_value = values.new_zeros(B)
    next_adv = values.new_zeros(B)
    for t in reversed(range(T)):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        mt = m[:, t]
        adv[:, t] = torch.where(mt, a, 0.0)
        next_value = torch.where(mt, values[:, t], next_value)
        next_adv = torch.where(mt, a, next_adv)
    returns = torch.where(m, adv + values, 0.0)
    return adv, returns


@torch.no_grad()
def group_advantages(
    rewards: torch.Tensor, group_ids: GroupIds, scale: str = "std", eps: float = 1e-6
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO outcome advantage ``A = r - mean_group`` (``scale="std"``: divided by ``std_group + eps``).

    ``std`` uses Bessel's correction (``torch.std`` default, like OpenRLHF and TRL's GRPO).
    ``scale="none"`` is Dr.GRPO's unscaled variant. Groups whose rewards are all equal, and
    singleton groups, get exactly 0.
    """
    if scale not in ("std", "none"):
        raise ValueError(f"unknown scale {scale!r}; allowed: std, none")
    idx, n = _group_index(group_ids, rewards.device)
    count, total, dead = _group_stats(rewards, idx, n)
    mean = (total / count)[idx]
    adv = rewards - mean
    if scale == "std":
        sq = torch.zeros_like(total).index_add_(0, idx, adv.square())
        std = (sq / (count - 1).clamp_min(1)).sqrt()
        adv = adv / (std[idx] + eps)
    adv = torch.where(dead[idx], 0.0, adv)
    return adv, _group_metrics(rewards, dead)


@torch.no_grad()
def rloo_advantages(rewards: torch.Tensor, group_ids: GroupIds) -> tuple[torch.Tensor, dict[str, float]]:
    """REINFORCE leave-one-out: ``A_i = r_i - mean_{j != i} r_j``; singleton or constant groups get 0."""
    idx, n = _group_index(group_ids, rewards.device)
    count, total, dead = _group_stats(rewards, idx, n)
    c = count[idx]
    adv = rewards - (total[idx] - rewards) / (c - 1).clamp_min(1)
    adv = torch.where(dead[idx], 0.0, adv)
    return adv, _group_metrics(rewards, dead)


@torch.no_grad()
def turn_level_advantages(
    turn_returns: list[torch.Tensor], group_ids: GroupIds, estimator: str, eps: float = 1e-6
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Group-relative advantages of each turn's return (`generation.turn_rewards.assign: turn`).

    ``turn_returns[i]`` holds episode i's return from each of its model turns on, the first being
    the episode's return. The baseline (and GRPO's scale) comes from the episode returns, exactly
    as `group_advantages` / `rloo_advantages` compute it, and applies to every turn:
    ``A_ik = (G_ik - b_i) / s_i``. So a turn's advantage differs from its episode's by what the
    turns before it earned (over the scale), and with a single turn it is the estimator's own.
    Groups whose episode returns are all equal, and singletons, get 0 (as the episode-level ones).
    """
    if estimator not in ("grpo", "dr_grpo", "rloo"):
        raise ValueError(f"turn-level advantages take grpo, dr_grpo or rloo, not {estimator!r}")
    episode = torch.stack([r[0] for r in turn_returns])
    idx, n = _group_index(group_ids, episode.device)
    count, total, dead = _group_stats(episode, idx, n)
    if estimator == "rloo":
        baseline = (total[idx] - episode) / (count[idx] - 1).clamp_min(1)
        scale = torch.ones_like(episode)
    else:
        baseline = (total / count)[idx]
        scale = torch.ones_like(episode)
        if estimator == "grpo":
            sq = torch.zeros_like(total).index_add_(0, idx, (episode - baseline).square())
            scale = (sq / (count - 1).clamp_min(1)).sqrt()[idx] + eps
    out = [
        torch.zeros_like(r) if bool(dead[idx[i]]) else (r - baseline[i]) / scale[i] for i, r in enumerate(turn_returns)
    ]
    return out, _group_metrics(episode, dead)


@torch.no_grad()
def reinforce_pp_advantages(
    token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """REINFORCE++: discounted return-to-go over valid tokens, whitened over the batch's valid tokens.

    Whitening uses the population std of all valid tokens (``+1e-8``), so it works for any batch
    composition without a critic or groups. Zero on padding.
    """
    m = mask.bool()
    B, T = token_rewards.shape
    ret = torch.zeros_like(token_rewards)
    running = token_rewards.new_zeros(B)
    for t in reversed(range(T)):
        mt = m[:, t]
        g = token_rewards[:, t] + gamma * running
        ret[:, t] = torch.where(mt, g, 0.0)
        running = torch.where(mt, g, running)
    adv, stats = whiten(ret, m)
    return adv, {"return_mean": stats["mean"], "return_std": stats["std"]}


@torch.no_grad()
def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, dict[str, float]]:
    """``(x - mean) / (std + eps)`` over the valid tokens of the whole batch (population std); zero on
    padding. Returns the whitened tensor and the mean and std it used."""
    m = mask.bool()
    mf = m.to(values.dtype)
    n = mf.sum().clamp_min(1)
    mean = (values * mf).sum() / n
    std = (((values - mean) * mf).square().sum() / n).sqrt()
    return torch.where(m, (values - mean) / (std + eps), 0.0), {"mean": mean.item(), "std": std.item()}


def broadcast_to_tokens(seq_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Spread one value per sequence ``[B]`` over its tokens ``[B, T]``; zero on padding."""
    return seq_values.unsqueeze(-1) * mask.to(seq_values.dtype)


@torch.no_grad()
def grpo_advantages(rewards: torch.Tensor, group_ids: GroupIds) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO: the group-relative advantage divided by the group's std (`group_advantages`)."""
    return group_advantages(rewards, group_ids, scale="std")


@torch.no_grad()
def dr_grpo_advantages(rewards: torch.Tensor, group_ids: GroupIds) -> tuple[torch.Tensor, dict[str, float]]:
    """Dr. GRPO: the group-relative advantage, unscaled (`group_advantages`)."""
    return group_advantages(rewards, group_ids, scale="none")


@torch.no_grad()
def reinforce_pp_baseline_advantages(
    rewards: torch.Tensor, group_ids: GroupIds
) -> tuple[torch.Tensor, dict[str, float]]:
    """REINFORCE++-baseline (verl and slime `reinforce_plus_plus_baseline`, OpenRLHF `reinforce_baseline`),
    its group half: the reward less its group's mean. The step's batch then whitens these over its
    valid tokens (`experience.build.batch_advantages`): a group baseline without GRPO's per-prompt
    std (which weighs nearly solved and nearly hopeless prompts up), on one scale for the batch."""
    return group_advantages(rewards, group_ids, scale="none")


def at_take_time(rewards: torch.Tensor, group_ids: GroupIds) -> tuple[torch.Tensor, dict[str, float]]:
    """REINFORCE++ and GAE: zero when the group is scored. Their advantages need the whole step's
    batch (whitened returns-to-go) or the critic's values of the step, so the step's batch fills
    them in (`experience.build.finalize_batch`)."""
    return torch.zeros_like(rewards), {}


GroupEstimator = Callable[[torch.Tensor, GroupIds], tuple[torch.Tensor, dict[str, float]]]

# `algorithm.advantage` -> the estimator a scored group's advantages come from. Adding an
# estimator is one entry here and its name in `AlgorithmConfig.advantage` (a test checks the two
# agree; the config cannot import this module, which imports torch).
ESTIMATORS: dict[str, GroupEstimator] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp_baseline": reinforce_pp_baseline_advantages,
    "reinforce_pp": at_take_time,
    "gae": at_take_time,
}


def estimator(name: str) -> GroupEstimator:
    """The registered estimator `algorithm.advantage` names; a ValueError naming the field and the
    known names for any other."""
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"algorithm.advantage: unknown estimator {name!r}; known: {', '.join(sorted(ESTIMATORS))}"
        ) from None


def filled_at_take_time(name: str) -> bool:
    """Whether an estimator's advantages come from the step's per-token rewards at take time (so
    a KL in the reward sits on each token, not in the sequence reward)."""
    return estimator(name) is at_take_time
