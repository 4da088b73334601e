"""Rollout: one admitted request's way from prompts to scored groups: generate on the least busy
engine, score with the reward, reference (or distillation's teacher) and judge workers at once
(the job's `ScoringCalls`), build each group's samples (over the samples whose reward did not
fail, `kept_samples`)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from actors.cluster import Cluster
from actors.workers.scoring_calls import ScoringCalls
from rlhf_cluster.config import JobConfig
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.experience.build import KLController, build_group, group_rollouts
from rlhf_cluster.experience.records import Rollout, ScoredSample
from rlhf_cluster.experience.turn_samples import broadcast_scores, scored_indices
from rlhf_cluster.rewards.turns import combined_reward
from rlhf_cluster.run.job_state import kept_samples, min_group_size
from rlhf_cluster.scoring.judge import with_judge
from rlhf_cluster.scoring.rewards import FAILED, reward_contexts


@dataclass
class ScoredGroup:
    """A prompt group's samples (rewards, reference or teacher log-probs, group advantages) and its metrics."""

    samples: list[ScoredSample]
    metrics: dict[str, float]
    worker: str
    requested_at: float
    generated_at: float  # when it was handed to scoring
    failed: int = 0  # samples left out because their reward failed (the group's advantages are over the rest)


async def _scored(calls: ScoringCalls, cfg: JobConfig, rollouts: list[Rollout], prompts: list[Prompt]) -> tuple:
    """Rewards (with the judge's, where the job has one) and the reference's log-probs of
    `rollouts` (with distillation the teacher's, which the samples carry in their place), in
    order. A rollout that failed before it could be scored (`Rollout.failure`: its agent raised,
    hung or died) is not sent to the scorers: it gets a failed reward (`reward_failed`), which the
    group's build leaves out like any other."""
    ok = [r for r in rollouts if not r.failure]
    if not ok:  # nothing to score: the whole group failed, and is dropped
        return [(0.0, {FAILED: 1.0})] * len(rollouts), None
    answers = {p.prompt_id: p.answer for p in prompts}
    texts = {p.prompt_id: p.text for p in prompts}
    rewarded = scored_indices(ok)  # an episode trained per turn is rewarded once, on its last turn
    answering = [ok[i] for i in rewarded]
    scores, reference, teacher, judged = await asyncio.gather(
        calls.rewards(answering, reward_contexts(prompts, cfg.data.conversational)),
        calls.reference_logprobs(ok),
        calls.teacher_logprobs(ok),
        calls.judge(answering, texts, answers),
    )
    refs = teacher if teacher is not None else reference  # a job runs one of the two pools at most
    judge = cfg.scoring.judge_source
    if judged is not None and judge is not None:
        scores, _ = with_judge(scores, judged, judge.weight, judge.name)
    scores = broadcast_scores(ok, rewarded, scores)
    if len(ok) == len(rollouts):
        return scores, refs
    failed: tuple[float, dict[str, float]] = (0.0, {FAILED: 1.0})
    got_scores, got_refs = iter(scores), iter(refs or [])
    merged_scores = [failed if r.failure else next(got_scores) for r in rollouts]
    if refs is None:
        return merged_scores, None
    return merged_scores, [[] if r.failure else next(got_refs) for r in rollouts]


async def rollout(
    cfg: JobConfig, cluster: Cluster, prompts: list[Prompt], version: int, kl: KLController
) -> list[ScoredGroup]:
    """Generate `prompts` with weights at least `version` on `cluster`'s generation pool, score
    them through its `scoring` calls, and build their groups (with the KL coefficient `kl` holds
    once they are scored).

    Streaming: one prompt per request, returned the moment its group finishes. Batched: the
    request's prompts together, after the worker has loaded `version`.
    """
    requested_at = time.time()
    call = (
        ("generate_group", prompts[0], version)
        if cfg.generation.mode == "streaming"
        else ("generate", prompts, version)
    )
    _, rollouts = await cluster.call("generation", *call)
    generated_at = time.time()
    scores, refs = await _scored(cluster.scoring, cfg, rollouts, prompts)
    if cfg.generation.turn_rewards.combine != "none":  # multi-turn: the environment's per-turn rewards too
        scores = [
            combined_reward(reward, components, r.turn_rewards or [], cfg.generation.turn_rewards)
            for r, (reward, components) in zip(rollouts, scores)
        ]
    by_index = {r.sample_id: i for i, r in enumerate(rollouts)}
    groups, at_least = [], min_group_size(cfg)
    for whole in group_rollouts(rollouts).values():
        kept = kept_samples([scores[by_index[r.sample_id]] for r in whole], at_least)
        group = [whole[k] for k in kept]
        idx = [by_index[r.sample_id] for r in group]
        samples, metrics = build_group(
            group,
            [scores[i] for i in idx],
            [refs[i] for i in idx] if refs else None,
            cfg.algorithm,
            kl_coef=kl.value,
            max_new_tokens=cfg.generation.sampling.max_new_tokens,
            turns=cfg.generation.turn_rewards,
        )
        groups.append(
            ScoredGroup(samples, metrics, group[0].worker, requested_at, generated_at, len(whole) - len(group))
        )
    return groups
