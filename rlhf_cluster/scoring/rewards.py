"""Rule-based rewards: a task's verifier applied to responses, components kept per sample."""

from __future__ import annotations

from rlhf_cluster.data.tasks import REWARD_WEIGHTS, VERIFIERS, combine_reward
from rlhf_cluster.records import Rollout


class RuleReward:
    """Scores responses with a built-in task's verifier and its component weights."""

    def __init__(self, task: str):
        if task not in VERIFIERS:
            raise ValueError(f"unknown reward task {task!r}; known: {sorted(VERIFIERS)}")
        self.verify = VERIFIERS[task]
        self.weights = REWARD_WEIGHTS[task]

    def score(self, rollouts: list[Rollout], answers: dict[str, str]) -> list[tuple[float, dict[str, float]]]:
        out = []
        for r in rollouts:
            if r.prompt_id not in answers:
                raise KeyError(f"no reference answer for prompt {r.prompt_id!r}")
            components = self.verify(r.response_text, answers[r.prompt_id])
            out.append((combine_reward(components, self.weights), components))
        return out
