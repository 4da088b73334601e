"""Scoring pool actors: rule-based rewards with frozen reward models, and the frozen reference model."""

from __future__ import annotations

import os
import time

import ray

from actors.workers._common import limit_threads, metrics_target, start_actor
from actors.workers.settings import ScoringSettings
from rlhf_cluster.config import FunctionReward
from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.scoring.rewards import RuleReward, combine_rewards, weighted_rule
from rlhf_cluster.telemetry import metrics as m
from rlhf_cluster.telemetry import tracing

# torch and the frozen models are imported where a worker loads a model: a reward worker with rule
# rewards alone starts without them (torch's import is most of its start-up).


@ray.remote(concurrency_groups={"health": 1})  # type: ignore[call-overload]  # ray's stubs lack concurrency_groups
class RewardWorker:
    """Applies the custom reward function (a `function` source in `scoring.rewards`) or the task's verifier to
    responses, combined with frozen reward models (`scoring.reward_models`) when the job has any.

    Samples whose custom reward failed come back with reward 0.0 and
    `reward_components["reward_failed"] = 1.0` (their groups are dropped), or the call raises
    (`on_error: fail`); `stats()` has this worker's running counts.
    """

    def __init__(self, settings: ScoringSettings, index: int):
        self.labels, self.metrics_port = start_actor(settings.basics, "reward", f"reward{index}")
        self.info_ = {
            "name": f"reward{index}",
            "metrics": metrics_target(settings.basics.metrics.bind_address, self.metrics_port),
            "pid": os.getpid(),
        }
        self.scoring = scoring = settings.scoring
        rule = scoring.rule_source
        if isinstance(rule, FunctionReward):  # a custom reward function, with its failure handling
            self.reward = RuleReward(
                settings.verifier_name,
                pattern=settings.verifier_pattern,
                reward_fn=rule.function,
                on_error=rule.on_error,
                timeout_s=rule.timeout_s,
                max_failure_fraction=rule.max_failure_fraction,
                failure_window=rule.failure_window,
            )
        else:
            self.reward = RuleReward(settings.verifier_name, pattern=settings.verifier_pattern)
        self.models = None
        if scoring.reward_models:
            import torch

            from rlhf_cluster.scoring.reward_model import FrozenRewardModels

            limit_threads(2)
            self.models = FrozenRewardModels(
                scoring.reward_models,
                getattr(torch, settings.model_dtype),
                scoring.max_tokens_per_batch,
                scoring.quantization,
            )

    def info(self) -> dict:
        return self.info_

    @ray.method(concurrency_group="health")
    def heartbeat(self) -> dict:
        """Answered on its own thread while a scoring call runs: a stopped process does not answer."""
        return {"stalled_s": 0.0, "spans": tracing.drain()}

    def stats(self) -> dict[str, int]:
        return {"scored": self.reward.scored, "failed": self.reward.failed, "timed_out": self.reward.timed_out}

    def score(self, rollouts: list[Rollout], answers: dict[str, str]) -> list[tuple[float, dict[str, float]]]:
        """(reward, components) per rollout: the rule reward, plus the reward models' when configured."""
        with tracing.span("score", responses=len(rollouts)):
            out = self.reward.score(rollouts, answers)
            if self.models is not None:
                s = self.scoring
                out = combine_rewards(
                    out,
                    self.models.score(rollouts),
                    rule_weight=s.rule_weight,
                    model_weight=s.reward_model_weight,
                    combine=s.reward_model_combine,
                )
            else:  # a rule alone: at its weight (0 beside a judge: recorded, not rewarded)
                out = weighted_rule(out, self.scoring.rule_weight)
        self.labels.of(m.SCORING_SAMPLES).inc(len(out))
        return out


@ray.remote(concurrency_groups={"health": 1})  # type: ignore[call-overload]  # ray's stubs lack concurrency_groups
class ReferenceWorker:
    """Per-token log-probs of responses under the frozen initial policy."""

    def __init__(self, settings: ScoringSettings, model_path: str, index: int):
        self.labels, self.metrics_port = start_actor(settings.basics, "reference", f"ref{index}")
        self.info_ = {
            "name": f"ref{index}",
            "metrics": metrics_target(settings.basics.metrics.bind_address, self.metrics_port),
            "pid": os.getpid(),
        }
        import torch

        from rlhf_cluster.scoring.reference import ReferenceModel

        limit_threads(2)
        self.model = ReferenceModel(
            model_path,
            getattr(torch, settings.model_dtype),
            temperature=settings.temperature,
            max_tokens_per_batch=settings.scoring.max_tokens_per_batch,
            quantization=settings.scoring.quantization,
        )

    def info(self) -> dict:
        return self.info_

    @ray.method(concurrency_group="health")
    def heartbeat(self) -> dict:
        """Answered on its own thread while a scoring call runs: a stopped process does not answer."""
        return {"stalled_s": 0.0, "spans": tracing.drain()}

    def logprobs(self, rollouts: list[Rollout]) -> list[list[float]]:
        tokens, began = sum(len(r.response_ids) for r in rollouts), time.time()
        out = self.model.logprobs(rollouts)
        ended = time.time()
        # The trace shows each call's throughput; the counters give the pool's over any window.
        tracing.add(
            "reference",
            began,
            ended,
            responses=len(rollouts),
            tokens=tokens,
            tokens_per_s=tokens / max(ended - began, 1e-9),
            token_budget=self.model.max_tokens_per_batch,
        )
        self.labels.of(m.SCORING_SAMPLES).inc(len(out))
        self.labels.of(m.SCORING_TOKENS).inc(tokens)
        self.labels.of(m.SCORING_SECONDS).inc(ended - began)
        return out
