"""Held-out evaluation of a published version: greedy and sampled accuracy, judged by the verifier."""

from __future__ import annotations

import statistics

from actors.cluster import Cluster
from rlhf_cluster.data.prompts import Prompt


async def held_out_accuracy(cluster: Cluster, prompts: list[Prompt], version: int, samples: int = 0) -> float | None:
    """Accuracy of `version` (or newer) on `prompts`: of greedy answers, or with `samples` > 0 the
    mean verifier score over that many sampled answers per prompt. None without held-out prompts."""
    if not prompts:
        return None
    _, rollouts = await cluster.call("generation", "evaluate", prompts, version, samples)
    answers = {p.prompt_id: p.answer for p in prompts}
    _, scores = await cluster.call("reward", "score", rollouts, answers)
    return statistics.fmean(components.get("correct", 0.0) for _, components in scores)


async def evaluate(cluster: Cluster, prompts: list[Prompt], version: int, samples: int) -> tuple[float | None, float | None]:
    """Greedy and (with `samples` > 0) sampled held-out accuracy."""
    greedy = await held_out_accuracy(cluster, prompts, version)
    return greedy, (await held_out_accuracy(cluster, prompts, version, samples) if samples and greedy is not None else None)
