"""Held-out evaluation of a published version: greedy and sampled accuracy and pass@k, judged by
the verifier."""

from __future__ import annotations

import statistics
from collections import defaultdict

from actors.cluster import Cluster
from rlhf_cluster.config import DataConfig
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.rollout_stats import mean_pass_at_k


async def _correct(cluster: Cluster, prompts: list[Prompt], version: int, samples: int = 0) -> dict[str, list[bool]]:
    """Per prompt, whether each answer of `version` (or newer) is right: one greedy answer, or
    with `samples` > 0 that many sampled ones."""
    _, rollouts = await cluster.call("generation", "evaluate", prompts, version, samples)
    answers = {p.prompt_id: p.answer for p in prompts}
    _, scores = await cluster.call("reward", "score", rollouts, answers)
    correct: dict[str, list[bool]] = defaultdict(list)
    for rollout, (_, components) in zip(rollouts, scores):
        correct[rollout.prompt_id].append(components.get("correct", 0.0) >= 1.0)
    return correct


def _accuracy(correct: dict[str, list[bool]]) -> float:
    return statistics.fmean(x for answers in correct.values() for x in answers)


async def evaluate(cluster: Cluster, prompts: list[Prompt], version: int, data: DataConfig) -> dict[str, float]:
    """`eval_accuracy` (greedy) and, with `data.eval_samples` > 0, `eval_sampled_accuracy` (mean
    verifier correctness of that many answers per prompt) and `eval_pass@k` for each k of
    `data.eval_pass_k`; empty without held-out prompts."""
    samples = data.eval_samples
    if not prompts:
        return {}
    out = {"eval_accuracy": _accuracy(await _correct(cluster, prompts, version))}
    if samples:
        sampled = await _correct(cluster, prompts, version, samples)
        out["eval_sampled_accuracy"] = _accuracy(sampled)
        out.update({f"eval_pass@{k}": mean_pass_at_k(sampled, k) for k in data.eval_pass_k})
    return out
