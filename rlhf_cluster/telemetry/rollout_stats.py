"""Statistics of a step's rollouts that warn of reward hacking before it shows in the reward:
response length (mean, percentiles, share truncated), reward spread, diversity (distinct-n over
the step's responses, unique responses per group), and held-out answers' correctness and pass@k. Pure
functions of token ids and numbers; Ray-free."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence

from rlhf_cluster.experience.records import ScoredSample


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def distinct_n(responses: Iterable[Sequence[int]], n: int) -> float:
    """Distinct n-grams over all responses / all n-grams (0 when no response has n tokens):
    1.0 when nothing repeats, near 0 when the policy says the same thing every time."""
    seen, total = set(), 0
    for tokens in responses:
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


def unique_per_group(groups: Iterable[Sequence[Sequence[int]]]) -> float:
    """Mean over groups of (distinct responses / responses): 1/n when a group's n responses are
    all the same (mode collapse), 1.0 when all differ."""
    shares = [len({tuple(r) for r in group}) / len(group) for group in groups if group]
    return sum(shares) / len(shares) if shares else 0.0


def model_turns(mask: Sequence[int]) -> int:
    """Turns the model wrote in an episode: runs of model tokens (1) between observations (0)."""
    return sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))


def rollout_stats(samples: list[ScoredSample]) -> dict[str, float]:
    """The step's length, truncation, reward-spread and diversity figures, keyed as `metrics.jsonl`
    columns; with multi-turn samples also the mean model turns per episode (2 when every episode
    makes one tool call and answers)."""
    lengths = [len(s.response_ids) for s in samples]
    rewards = [s.reward for s in samples]
    groups: dict[str, list[Sequence[int]]] = defaultdict(list)
    for s in samples:
        groups[s.group_id].append(s.response_ids)
    responses = [s.response_ids for s in samples]
    return {
        "response_len_p50": percentile(lengths, 50),
        "response_len_p90": percentile(lengths, 90),
        "response_len_max": max(lengths),
        "truncated_fraction": sum(s.finish_reason == "length" for s in samples) / len(samples),
        "reward_min": min(rewards),
        "reward_max": max(rewards),
        "distinct_1": distinct_n(responses, 1),
        "distinct_2": distinct_n(responses, 2),
        "distinct_3": distinct_n(responses, 3),
        "unique_per_group": unique_per_group(groups.values()),
        **(
            {"episode_turns_mean": statistics.fmean(model_turns(s.model_tokens) for s in samples)}
            if any(s.loss_mask is not None for s in samples)
            else {}
        ),
    }


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The unbiased pass@k estimate from `n` sampled answers of which `correct` are right:
    1 - C(n - c, k) / C(n, k), the chance that k answers drawn without replacement include a
    right one (Chen et al. 2021)."""
    if not 0 <= correct <= n or not 1 <= k <= n:
        raise ValueError(f"pass@{k} of {correct} correct in {n}: need 0 <= correct <= n and 1 <= k <= n")
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


# The reward components that say whether an answer is right: the verifier's (or a function's own)
# `correct`, else verl's `acc` (a compute_score returning {"score": ..., "acc": ...}).
CORRECTNESS = ("correct", "acc")


def answer_correct(components: dict[str, float]) -> bool | None:
    """Whether an answer is right by its reward's components (`CORRECTNESS`, the first present, at
    least 1); None when they say nothing of it (a reward function returning a bare number, a
    reward model): its held-out accuracy is not measured, only its reward."""
    for key in CORRECTNESS:
        if key in components:
            return components[key] >= 1.0
    return None


def accuracy(correct_by_prompt: dict[str, list[bool]]) -> float:
    """The share of right answers over every prompt's answers."""
    return statistics.fmean(x for answers in correct_by_prompt.values() for x in answers)


def accuracy_by_source(correct_by_prompt: dict[str, list[bool]], source_of: dict[str, str | None]) -> dict[str, float]:
    """`accuracy` within each source of the prompts that name one (empty when none does)."""
    grouped: dict[str, dict[str, list[bool]]] = {}
    for prompt_id, answers in correct_by_prompt.items():
        source = source_of.get(prompt_id)
        if source is not None:
            grouped.setdefault(source, {})[prompt_id] = answers
    return {source: accuracy(group) for source, group in sorted(grouped.items())}


def mean_pass_at_k(correct_by_prompt: dict[str, list[bool]], k: int) -> float:
    """pass@k averaged over prompts (each prompt's estimate from its own answers)."""
    return statistics.fmean(pass_at_k(len(c), sum(c), k) for c in correct_by_prompt.values())
