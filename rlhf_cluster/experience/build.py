"""Turn a scored group of rollouts into buffer samples: reward shaping, KL-in-reward, advantages.

This runs before the learner, where a whole group is available, so the learner only recomputes
log-probs and updates.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

import torch

from rlhf_cluster.algorithms import (
    distillation_advantages,
    gae,
    kl_penalty,
    reinforce_pp_advantages,
    turn_level_advantages,
    whiten,
)
from rlhf_cluster.algorithms.advantages import estimator, filled_at_take_time  # typed (the package's are lazy: Any)
from rlhf_cluster.algorithms.kl import AdaptiveKLController, FixedKLController
from rlhf_cluster.config import AlgorithmConfig, DistillationConfig, KLConfig, TurnRewardsConfig
from rlhf_cluster.experience.group_filter import keeps
from rlhf_cluster.experience.records import Rollout, ScoredSample, TrainBatch
from rlhf_cluster.experience.turn_samples import episode_advantages
from rlhf_cluster.models.packing import balanced_shares
from rlhf_cluster.rewards import dynamic_sampling_filter, length_penalty, overlong_filter_mask, overlong_penalty
from rlhf_cluster.rewards.turns import turn_returns


def build_group(
    rollouts: list[Rollout],
    scores: list[tuple[float, dict[str, float]]],
    ref_logprobs: list[list[float]] | None,
    cfg: AlgorithmConfig,
    *,
    kl_coef: float,
    max_new_tokens: int,
    turns: TurnRewardsConfig | None = None,
) -> tuple[list[ScoredSample], dict[str, float]]:
    """Samples of one prompt group with per-token advantages, and group metrics.

    Reward = task reward + shaping (overlong, length) - kl_coef * sum_t k1 when the KL sits in
    the reward; every term is recorded in `reward_components`. The estimator is the one
    `cfg.advantage` names (`algorithms.advantages.ESTIMATORS`). REINFORCE++ whitens over the
    whole step's batch, so its advantages are filled in by `batch_advantages` at take time; GAE
    needs the critic's values of the step, so `critic_advantages` fills them in then. Both put the
    KL on each token (`token_rewards`) rather than summed into the sequence reward here.
    `metrics["zero_signal"]` is 1 when all rewards of the group are equal (those trained on, or the
    scoring pool's: `shaping.dynamic_sampling_metric`). With `turns.assign`
    `turn`, each model turn's tokens get the advantage of that turn's return (`turn_returns`,
    `turn_level_advantages`) instead of the episode's.
    """
    refs = _checked_refs(rollouts, scores, ref_logprobs)
    components = [dict(s[1]) for s in scores]
    task = torch.tensor([s[0] for s in scores], dtype=torch.float64)  # as scored (`_shaped` adds, not in place)
    rewards = _shaped(task, components, rollouts, cfg, max_new_tokens)
    if cfg.kl.placement == "reward" and kl_coef > 0 and not filled_at_take_time(cfg.advantage):
        rewards = _kl_in_reward(rewards, components, rollouts, refs, kl_coef)
    token_adv, metrics = _token_advantages(rollouts, rewards, cfg.advantage, turns)
    # One group: kept whole or not at all. Compared on the reward trained on or the scoring pool's (`task_reward`).
    signal = rewards if cfg.shaping.dynamic_sampling_metric == "reward" else task
    kept, _ = dynamic_sampling_filter(signal, [r.group_id for r in rollouts])
    metrics["zero_signal"] = float(not bool(kept.any()))
    if cfg.distillation is not None:  # the reference log-probs are the teacher's (it is what the reference pool serves)
        token_adv = _distilled(rollouts, refs, token_adv, cfg.distillation, metrics)
    samples = [
        ScoredSample(
            sample_id=r.sample_id,
            prompt_id=r.prompt_id,
            group_id=r.group_id,
            prompt_ids=list(r.prompt_ids),
            response_ids=list(r.response_ids),
            rollout_logprobs=list(r.rollout_logprobs),
            policy_version=r.policy_version,
            policy_versions=None if r.policy_versions is None else list(r.policy_versions),
            loss_mask=None if r.loss_mask is None else list(r.loss_mask),
            routed_experts=r.routed_experts,  # immutable: shared, not copied
            images=r.images,  # a tuple of bytes: shared, not copied
            finish_reason=r.finish_reason,
            reward=float(reward),
            reward_components=c,
            ref_logprobs=list(ref),
            advantages=a,
        )
        for r, reward, c, ref, a in zip(rollouts, rewards.tolist(), components, refs, token_adv)
    ]
    if cfg.shaping.group_filter is not None:  # the user's test in place of the all-equal one
        metrics["zero_signal"] = float(not keeps(cfg.shaping.group_filter, samples))
    return samples, metrics


def _checked_refs(
    rollouts: list[Rollout], scores: list[tuple[float, dict[str, float]]], ref_logprobs: list[list[float]] | None
) -> list[list[float]]:
    """The group's reference log-probs (the rollout's own when there is no reference), after
    checking that the rollouts are one group and that scores and log-probs match them."""
    if not rollouts:
        raise ValueError("build_group needs at least one rollout")
    if len({r.group_id for r in rollouts}) != 1:
        raise ValueError("build_group takes the rollouts of exactly one group")
    if len(scores) != len(rollouts) or (ref_logprobs is not None and len(ref_logprobs) != len(rollouts)):
        raise ValueError("scores and reference log-probs must match the rollouts one to one")
    refs = ref_logprobs if ref_logprobs is not None else [list(r.rollout_logprobs) for r in rollouts]
    for r, ref in zip(rollouts, refs):
        if len(ref) != len(r.response_ids):
            raise ValueError(
                f"sample {r.sample_id}: {len(ref)} reference log-probs for {len(r.response_ids)} response tokens"
            )
    return refs


def _shaped(
    rewards: torch.Tensor,
    components: list[dict[str, float]],
    rollouts: list[Rollout],
    cfg: AlgorithmConfig,
    max_new_tokens: int,
) -> torch.Tensor:
    """Rewards with the overlong and length penalties added, each recorded in `components`."""
    lengths = torch.tensor([len(r.response_ids) for r in rollouts], dtype=torch.float64)
    shaping = cfg.shaping
    penalties = {}
    buffer = shaping.overlong_buffer_tokens(max_new_tokens)
    if buffer:
        penalties["overlong"] = overlong_penalty(lengths, max_new_tokens, buffer, shaping.overlong_penalty)
    if shaping.length_target is not None:
        penalties["length"] = length_penalty(lengths, shaping.length_target, shaping.length_coef)
    for name, penalty in penalties.items():
        rewards = rewards + penalty.double()
        for c, p in zip(components, penalty.double().tolist()):
            c[name] = p
    return rewards


def _kl_in_reward(
    rewards: torch.Tensor,
    components: list[dict[str, float]],
    rollouts: list[Rollout],
    refs: list[list[float]],
    kl_coef: float,
) -> torch.Tensor:
    """Rewards less kl_coef x each sequence's summed k1 to the reference (component `kl_penalty`)."""
    kl_sum = torch.tensor(
        [
            float(kl_penalty(torch.tensor(r.rollout_logprobs), torch.tensor(ref), "k1").sum())
            for r, ref in zip(rollouts, refs)
        ],
        dtype=torch.float64,
    )
    for c, kl in zip(components, kl_sum.tolist()):
        c["kl_penalty"] = -kl_coef * kl
    return rewards - kl_coef * kl_sum


def _token_advantages(
    rollouts: list[Rollout], rewards: torch.Tensor, name: str, turns: TurnRewardsConfig | None
) -> tuple[list[list[float]], dict[str, float]]:
    """Each rollout's per-token advantages from the estimator `name`: per turn's return
    (`turns.assign: turn`), per episode (agent turns as samples), or per rollout."""
    group_ids = [r.group_id for r in rollouts]
    per_turn = any(r.episode_id for r in rollouts)  # agent turns as samples: advantages over episodes
    if turns is not None and turns.assign == "turn" and not per_turn:  # (with the group estimators only)
        return _turn_level(rollouts, rewards, group_ids, name, turns)
    if per_turn:
        adv, metrics = episode_advantages(rollouts, rewards, group_ids, estimator(name))
    else:
        adv, metrics = estimator(name)(rewards, group_ids)
    return [[float(a)] * len(r.response_ids) for r, a in zip(rollouts, adv.tolist())], metrics


def _distilled(
    rollouts: list[Rollout],
    refs: list[list[float]],
    token_adv: list[list[float]],
    distill: DistillationConfig,
    metrics: dict[str, float],
) -> list[list[float]]:
    """On-policy distillation: each token's reverse-KL advantage to the teacher (`refs`), alone or
    added to the task's (`mix_with_rewards`); its metrics go into `metrics`."""
    distilled, distill_metrics = distillation_advantages(
        [list(r.rollout_logprobs) for r in rollouts], refs, distill.coef, [r.loss_mask for r in rollouts]
    )
    metrics.update(distill_metrics)
    metrics["zero_signal"] = 0.0  # every token has the teacher's signal, whatever the rewards
    return [
        [d + a for d, a in zip(ds, task)] if distill.mix_with_rewards else ds for ds, task in zip(distilled, token_adv)
    ]


def _turn_level(
    rollouts: list[Rollout], rewards: torch.Tensor, group_ids: list, estimator: str, turns: TurnRewardsConfig
) -> tuple[list[list[float]], dict[str, float]]:
    """Per-token advantages where every token of model turn k carries turn k's advantage (tokens
    an environment wrote after it too; the loss mask leaves them out). A rollout without turns (a
    single response) is one turn: its episode's advantage."""
    returns = [
        torch.tensor(
            turn_returns(float(reward), r.turn_rewards or [], turns) if r.turn_starts else [float(reward)],
            dtype=torch.float64,
        )
        for r, reward in zip(rollouts, rewards.tolist())
    ]
    per_turn, metrics = turn_level_advantages(returns, group_ids, estimator)
    out = []
    for r, adv in zip(rollouts, per_turn):
        starts = r.turn_starts or [0]
        ends = [*starts[1:], len(r.response_ids)]
        tokens = [0.0] * starts[0]  # an opening observation (before the first turn) is never trained on
        for a, start, end in zip(adv.tolist(), starts, ends):
            tokens += [a] * (end - start)
        out.append(tokens)
    return out, metrics


def token_rewards(
    samples: list[ScoredSample], cfg: AlgorithmConfig, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``[B, T]`` and the response mask of a step's samples.

    A token's reward is -kl_coef * k1_t when the KL sits in the reward, and the last token the
    model sampled also gets the sequence reward (task reward + shaping). The mask (and so every
    reward) is zero on padding and on tokens an environment wrote (`loss_mask`).
    """
    T = max(max(len(s.response_ids) for s in samples), 1)
    mask = torch.zeros(len(samples), T)
    rewards = torch.zeros(len(samples), T)
    for i, s in enumerate(samples):
        n = len(s.response_ids)
        if n == 0:
            continue
        mask[i, :n] = torch.tensor(s.model_tokens, dtype=mask.dtype)
        if not mask[i].any():
            continue
        if cfg.kl.placement == "reward" and kl_coef > 0:
            kl = kl_penalty(torch.tensor(s.rollout_logprobs), torch.tensor(s.ref_logprobs), "k1")
            rewards[i, :n] = -kl_coef * kl * mask[i, :n]
        rewards[i, int(mask[i].nonzero().max())] += s.reward
    return rewards, mask


def batch_advantages(
    samples: list[ScoredSample], cfg: AlgorithmConfig, kl_coef: float, in_loss: list[bool] | None = None
) -> dict[str, float]:
    """Fill in advantages that need the whole step's batch, in place: REINFORCE++'s
    (`reinforce_pp_advantages` turns the `token_rewards` into whitened returns-to-go), and
    REINFORCE++-baseline's group advantages whitened over the valid tokens of the samples `in_loss`
    (the overlong filter's truncated ones, long and mostly poor, would shift the mean)."""
    if cfg.advantage == "reinforce_pp_baseline":
        return _whiten_in_place(samples, in_loss or [True] * len(samples))
    if cfg.advantage != "reinforce_pp":
        return {}
    rewards, mask = token_rewards(samples, cfg, kl_coef)
    adv, metrics = reinforce_pp_advantages(rewards, mask, gamma=cfg.gamma)
    for i, s in enumerate(samples):
        s.advantages = adv[i, : len(s.response_ids)].tolist()
    return metrics


def _whiten_in_place(samples: list[ScoredSample], in_loss: list[bool]) -> dict[str, float]:
    """The samples' per-token advantages whitened over the valid (model) tokens of those in the loss."""
    T = max(max(len(s.response_ids) for s in samples), 1)
    adv, mask = torch.zeros(len(samples), T, dtype=torch.float64), torch.zeros(len(samples), T, dtype=torch.bool)
    for i, s in enumerate(samples):
        n = len(s.response_ids)
        adv[i, :n] = torch.tensor(s.advantages, dtype=adv.dtype)
        mask[i, :n] = torch.tensor(s.model_tokens, dtype=torch.bool) & in_loss[i]
    white, stats = whiten(adv, mask)
    for i, s in enumerate(samples):
        s.advantages = white[i, : len(s.response_ids)].tolist()
    return {"batch_mean": stats["mean"], "batch_std": stats["std"]}


def critic_advantages(
    samples: list[ScoredSample], values: list[list[float]], cfg: AlgorithmConfig, kl_coef: float
) -> tuple[list[list[float]], dict[str, float]]:
    """PPO with a critic: GAE advantages from the `token_rewards` and the critic's per-token values.

    Sets each sample's advantages in place (whitened over the batch's tokens when
    `cfg.whiten_advantages`) and returns the per-token returns (advantage + value, unwhitened:
    the critic's regression targets) with batch metrics.
    """
    if len(values) != len(samples):
        raise ValueError(f"critic_advantages: {len(values)} value rows for {len(samples)} samples")
    rewards, mask = token_rewards(samples, cfg, kl_coef)
    v = torch.zeros_like(rewards)
    for i, (s, row) in enumerate(zip(samples, values)):
        if len(row) != len(s.response_ids):
            raise ValueError(f"sample {s.sample_id}: {len(row)} values for {len(s.response_ids)} response tokens")
        v[i, : len(row)] = torch.tensor(row, dtype=v.dtype)
    adv, returns = gae(rewards, v, mask, gamma=cfg.gamma, lam=cfg.lam)
    n = mask.sum().clamp_min(1)
    metrics = {
        "return_mean": float((returns * mask).sum() / n),
        "value_mean": float((v * mask).sum() / n),
        "gae_mean": float((adv * mask).sum() / n),
    }
    if cfg.whiten_advantages:
        adv, stats = whiten(adv, mask)
        metrics["gae_std"] = stats["std"]
    for i, s in enumerate(samples):
        s.advantages = adv[i, : len(s.response_ids)].tolist()
    return [returns[i, : len(s.response_ids)].tolist() for i, s in enumerate(samples)], metrics


def accept_group(metrics: dict[str, float], cfg: AlgorithmConfig) -> bool:
    """Dynamic sampling (DAPO): a group whose rewards are all equal carries no learning signal and
    is dropped (the producer generates another in its place)."""
    return not (cfg.shaping.dynamic_sampling and metrics["zero_signal"])


@dataclass
class StepBatch:
    """A step's samples ready for the learner: final advantages, which samples enter the loss,
    and (PPO with a critic) the critic's per-token targets and the values the advantages used."""

    samples: list[ScoredSample]
    in_loss: list[bool]
    returns: list[list[float]] | None = None
    old_values: list[list[float]] | None = None

    def policy_shares(self, world: int) -> list[TrainBatch]:
        """The policy ranks' shares: equal row counts (+-1) and near-equal tokens (`balanced_shares`):
        the step waits for its slowest rank."""
        lengths = [len(s.prompt_ids) + len(s.response_ids) for s in self.samples]
        return [
            TrainBatch.from_samples([self.samples[i] for i in share], in_loss=[self.in_loss[i] for i in share])
            for share in balanced_shares(lengths, world)
        ]

    def critic_shares(self, world: int) -> list[TrainBatch]:
        """The critic's round-robin shares, with the returns it regresses to and the old values."""
        if self.returns is None or self.old_values is None:
            raise ValueError("this batch has no critic targets (finalize_batch was given no values)")
        return [
            TrainBatch.from_samples(
                self.samples[r::world],
                in_loss=self.in_loss[r::world],
                returns=self.returns[r::world],
                old_values=self.old_values[r::world],
            )
            for r in range(world)
        ]


def finalize_batch(
    samples: list[ScoredSample], cfg: AlgorithmConfig, kl_coef: float, values: list[list[float]] | None = None
) -> tuple[StepBatch, dict[str, float]]:
    """The one place a step's batch becomes final, on copies (buffered samples are not changed):
    advantages that need the whole batch (REINFORCE++ whitened returns-to-go; GAE from the critic's
    per-token `values`, with the KL on each token), and the overlong filter's loss mask.
    Group advantages (GRPO, Dr. GRPO, RLOO) and the sequence-level KL shaping were fixed when the
    group was scored (`build_group`)."""
    if (cfg.advantage == "gae") != (values is not None):
        raise ValueError("finalize_batch: critic values are needed exactly when algorithm.advantage is gae")
    samples = [replace(s, advantages=list(s.advantages)) for s in samples]
    in_loss = (
        overlong_filter_mask([s.finish_reason for s in samples]).tolist()
        if cfg.shaping.overlong_filter
        else [True] * len(samples)
    )
    metrics: dict[str, float] = {}
    returns = None
    if values is not None:
        returns, metrics = critic_advantages(samples, values, cfg, kl_coef)
    else:
        metrics = batch_advantages(samples, cfg, kl_coef, in_loss)
    out = {f"advantage/{k}": v for k, v in metrics.items()}
    out["samples_in_loss"] = sum(in_loss)
    return StepBatch(samples, in_loss, returns, values), out


def observe_step_kl(controller: KLController, policy_kl: float, samples: list[ScoredSample]) -> None:
    """Feed a step's KL to the controller: it steers per-sequence KL (the per-token mean times the
    mean response length), as in Ziegler et al."""
    mean_len = statistics.fmean(len(s.response_ids) for s in samples)
    controller.update(policy_kl * mean_len, len(samples))


KLController = FixedKLController | AdaptiveKLController


def kl_controller(cfg: KLConfig) -> KLController:
    """The KL coefficient controller a job's config asks for."""
    if cfg.controller == "adaptive":
        return AdaptiveKLController(cfg.coef, cfg.target, cfg.horizon)
    return FixedKLController(cfg.coef)


def group_rollouts(rollouts: list[Rollout]) -> dict[str, list[Rollout]]:
    """Rollouts by group id, in arrival order."""
    groups: dict[str, list[Rollout]] = {}
    for r in rollouts:
        groups.setdefault(r.group_id, []).append(r)
    return groups
