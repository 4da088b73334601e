"""CriticRank actors: PPO's value model as its own `RankGroup`, sized by `critic.world_size` apart
from the policy learner's; the trainer asks it for the values of each step's batch before the
policy step, then trains both on it.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING

import ray

from actors.workers._common import limit_threads
from actors.workers.learner import ShardedRank
from actors.workers.settings import CriticRankSettings
from rlhf_cluster.experience.records import TrainBatch
from rlhf_cluster.telemetry import metrics as m
from rlhf_cluster.telemetry import tracing

if TYPE_CHECKING:
    from rlhf_cluster.learner.critic import ValueLearner


@ray.remote(concurrency_groups={"health": 1})  # type: ignore[call-overload]  # ray's stubs lack concurrency_groups
class CriticRank(ShardedRank):
    """One rank of the critic group (a `ValueLearner`)."""

    settings: CriticRankSettings

    def __init__(self, settings: CriticRankSettings, policy_path: str, rank: int, world_size: int):
        super().__init__(settings.basics, "critic", f"rank{rank}")
        self.settings = settings
        self.policy_path, self.rank, self.world_size = policy_path, rank, world_size
        self.checkpoint_write: Future | None = None
        self.learner: ValueLearner | None = None
        limit_threads(world_size + 1)

    def _set_up(self) -> ValueLearner:
        """The value learner `setup` built: a collective called before it is the driver's bug."""
        if self.learner is None:
            raise RuntimeError(f"critic rank {self.rank}: called before setup()")
        return self.learner

    def _build_learner(self) -> ValueLearner:
        # Imported here: the driver imports this module for the actor class, never the learner (FSDP2's stack).
        from rlhf_cluster.learner.critic import ValueLearner

        return ValueLearner(self.settings.critic, self.settings.spec, self.policy_path)

    def values(self, batch: TrainBatch) -> list[list[float]]:
        """Collective: the per-token values of each response in this rank's share of the step's batch."""
        with tracing.span("values"):
            values = self._set_up().values(batch)
        lengths = (batch.attention_mask.sum(1) - batch.prompt_lengths).tolist()
        return [values[i, :n].tolist() for i, n in enumerate(lengths)]

    def train(self, batch: TrainBatch) -> dict[str, float]:
        """Collective: one clipped-value-loss step on this rank's share (with returns and old values)."""
        with tracing.span("train_step"):
            metrics = self._set_up().train_step(batch)
        self.labels.of(m.LEARNER_STEP_SECONDS).observe(metrics["critic/step_seconds"])
        self.labels.of(m.LEARNER_TOKENS).inc(float(batch.response_mask.sum()))
        return metrics
