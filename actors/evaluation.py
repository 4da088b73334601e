"""Held-out evaluation of a published version: greedy and sampled reward, and accuracy and pass@k
where the reward says whether an answer is right (the verifier's `correct`, verl's `acc`:
`answer_correct`)."""

from __future__ import annotations

import asyncio
import statistics
from collections import defaultdict

from actors.cluster import Cluster
from rlhf_cluster.config import DataConfig
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.experience.turn_samples import scored_indices
from rlhf_cluster.scoring.rewards import reward_contexts
from rlhf_cluster.telemetry.rollout_stats import accuracy, accuracy_by_source, answer_correct, mean_pass_at_k

EVAL_SCORING_CALL = 64  # rollouts per scoring call of an evaluation (one prompt's answers may be more)


def _by_prompt(rollouts: list[Rollout], size: int) -> list[list[Rollout]]:
    """`rollouts` in order, in parts of whole prompts (consecutive ones of a prompt id) of at most
    `size` rollouts, or one prompt's alone where it has more."""
    groups: list[list[Rollout]] = []  # consecutive rollouts of one prompt
    for rollout in rollouts:
        if groups and groups[-1][-1].prompt_id == rollout.prompt_id:
            groups[-1].append(rollout)
        else:
            groups.append([rollout])
    parts: list[list[Rollout]] = []
    for group in groups:
        if parts and len(parts[-1]) + len(group) <= size:
            parts[-1].extend(group)
        else:
            parts.append(list(group))
    return parts


async def _judged(
    cluster: Cluster, prompts: list[Prompt], version: int, samples: int = 0, conversational: bool = False
) -> tuple[dict[str, list[bool]] | None, list[float]]:
    """Per prompt, whether each answer of `version` (or newer) is right (None when no answer's
    reward says: `answer_correct`; one that does not, a failed one, is not right), and every
    answer's reward: one greedy answer per prompt, or with `samples` > 0 that many sampled ones."""
    _, rollouts = await cluster.call("generation", "evaluate", prompts, version, samples)
    rollouts = [rollouts[i] for i in scored_indices(rollouts)]  # an episode trained per turn: its answer
    contexts = reward_contexts(prompts, conversational)  # data.columns.messages: TRL's form for batch functions
    # Scored in parts of whole prompts, as many at once as there are reward workers: a batch reward
    # function's call (and its timeout) sees about a training call's size, not the whole held-out set.
    at_once = asyncio.Semaphore(max(1, len(cluster.pools["reward"])))

    async def scored(part: list[Rollout]) -> list:
        async with at_once:  # each part with its own prompts' contexts
            own = {r.prompt_id: contexts[r.prompt_id] for r in part}
            return (await cluster.call("reward", "score", part, own))[1]

    parts = await asyncio.gather(*(scored(part) for part in _by_prompt(rollouts, EVAL_SCORING_CALL)))
    scores = [score for part in parts for score in part]
    said = [answer_correct(components) for _, components in scores]
    if all(right is None for right in said):
        return None, [reward for reward, _ in scores]
    correct: dict[str, list[bool]] = defaultdict(list)
    for rollout, right in zip(rollouts, said):
        correct[rollout.prompt_id].append(bool(right))
    return correct, [reward for reward, _ in scores]


async def evaluate(cluster: Cluster, prompts: list[Prompt], version: int, data: DataConfig) -> dict[str, float]:
    """`eval_reward_mean` and `eval_accuracy` (greedy), `eval_accuracy/<source>` per source when
    the prompts name one, and with `data.eval_samples` > 0 `eval_sampled_reward_mean`,
    `eval_sampled_accuracy` (mean correctness of that many answers per prompt, mean@k) and
    `eval_pass@k` for each k of `data.eval_pass_k`; the accuracy columns only where the reward says
    whether an answer is right (`answer_correct`). Empty without held-out prompts."""
    samples = data.eval_samples
    if not prompts:
        return {}
    greedy, rewards = await _judged(cluster, prompts, version, 0, data.conversational)
    out = {"eval_reward_mean": statistics.fmean(rewards)}
    if greedy is not None:
        out["eval_accuracy"] = accuracy(greedy)
        sources = {p.prompt_id: p.source for p in prompts}
        out.update({f"eval_accuracy/{source}": value for source, value in accuracy_by_source(greedy, sources).items()})
    if samples:
        sampled, sampled_rewards = await _judged(cluster, prompts, version, samples, data.conversational)
        out["eval_sampled_reward_mean"] = statistics.fmean(sampled_rewards)
        if sampled is not None:
            out["eval_sampled_accuracy"] = accuracy(sampled)
            out.update({f"eval_pass@{k}": mean_pass_at_k(sampled, k) for k in data.eval_pass_k})
    return out
