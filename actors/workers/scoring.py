"""Scoring pool actors: rule-based rewards with frozen reward models, and per-token log-probs of
a frozen model: the initial policy's (the reference) or, with `algorithm.distillation`, the
teacher's. Every pool worker is built as `Worker(settings, model_path, index, slot)`
(`actors/workers/pool_table.py`)."""

from __future__ import annotations

import time

import ray

from actors.workers._common import Worker, limit_threads
from actors.workers.settings import ScoringSettings
from rlhf_cluster.config import FunctionReward
from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.scoring.rewards import RewardContext, RuleReward, combine_rewards, weighted_rule
from rlhf_cluster.telemetry import metrics as m
from rlhf_cluster.telemetry import tracing

# torch and the frozen models are imported where a worker loads a model: a reward worker with rule
# rewards alone starts without them (torch's import is most of its start-up).


@ray.remote(concurrency_groups={"health": 1})  # type: ignore[call-overload]  # ray's stubs lack concurrency_groups
class RewardWorker(Worker):
    """Applies the custom reward function (a `function` source in `scoring.rewards`) or the task's verifier to
    responses, combined with the `model` source's frozen reward models when the job has any.

    Samples whose custom reward failed come back with reward 0.0 and
    `reward_components["reward_failed"] = 1.0` (their groups are dropped), or the call raises
    (`on_error: fail`); `stats()` has this worker's running counts.
    """

    def __init__(self, settings: ScoringSettings, model_path: str | None, index: int, slot: int | None = None):
        """`model_path`: None (the reward models' folders are the `model` source's); `slot`: unused."""
        super().__init__(settings.basics, "reward", f"reward{index}")
        scoring = settings.scoring
        rule = scoring.rule_source
        if isinstance(rule, FunctionReward):  # a custom reward function, with its failure handling
            self.reward = RuleReward(
                settings.verifier_name,
                pattern=settings.verifier_pattern,
                reward_fn=rule.function,
                on_error=rule.on_error,
                timeout_s=rule.timeout_s,
                concurrency=rule.concurrency,
                max_failure_fraction=rule.max_failure_fraction,
                failure_window=rule.failure_window,
            )
        else:
            self.reward = RuleReward(settings.verifier_name, pattern=settings.verifier_pattern)
        self.rule_weight = rule.weight if rule is not None else 0.0
        model = scoring.model_source
        self.model_source = model = model if model is not None and model.models else None  # none yet: a rule alone
        self.models = None
        if model is not None:
            import torch

            from rlhf_cluster.scoring.reward_model import FrozenRewardModels

            limit_threads(2)
            self.models = FrozenRewardModels(
                model.models, getattr(torch, settings.model_dtype), scoring.max_tokens_per_batch, scoring.quantization
            )

    def stats(self) -> dict[str, int]:
        return {"scored": self.reward.scored, "failed": self.reward.failed, "timed_out": self.reward.timed_out}

    def score(
        self, rollouts: list[Rollout], contexts: dict[str, RewardContext]
    ) -> list[tuple[float, dict[str, float]]]:
        """(reward, components) per rollout: the rule reward, plus the reward models' when configured.
        `contexts`: each prompt's answer and what a custom reward function may take besides."""
        with tracing.span("score", responses=len(rollouts)):
            out = self.reward.score(rollouts, contexts)
            if self.models is not None and self.model_source is not None:
                out = combine_rewards(
                    out,
                    self.models.score(rollouts),
                    rule_weight=self.rule_weight,
                    model_weight=self.model_source.weight,
                    combine=self.model_source.combine,
                )
            else:  # a rule alone: at its weight (0 beside a judge: recorded, not rewarded)
                out = weighted_rule(out, self.rule_weight)
        self.labels.of(m.SCORING_SAMPLES).inc(len(out))
        return out


class LogProbWorker(Worker):
    """Per-token log-probs of responses under one frozen model; `ReferenceWorker` and
    `TeacherWorker` are its two pools (their own names in metrics, traces and logs)."""

    pool: str
    prefix: str

    def __init__(self, settings: ScoringSettings, model_path: str, index: int, slot: int | None = None):
        """`model_path`: the frozen model's folder; `slot`: unused."""
        super().__init__(settings.basics, self.pool, f"{self.prefix}{index}")
        import torch

        from rlhf_cluster.scoring.reference import ReferenceModel

        limit_threads(2)
        self.model = ReferenceModel(
            model_path,
            getattr(torch, settings.model_dtype),
            temperature=settings.temperature,
            max_tokens_per_batch=settings.scoring.max_tokens_per_batch,
            quantization=settings.scoring.quantization,
            min_pixels=settings.pixels[0],
            max_pixels=settings.pixels[1],
        )

    def logprobs(self, rollouts: list[Rollout]) -> list[list[float]]:
        tokens, began = sum(len(r.response_ids) for r in rollouts), time.time()
        out = self.model.logprobs(rollouts)
        ended = time.time()
        # The trace shows each call's throughput; the counters give the pool's over any window.
        tracing.add(
            self.pool,
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


@ray.remote(concurrency_groups={"health": 1})  # type: ignore[call-overload]  # ray's stubs lack concurrency_groups
class ReferenceWorker(LogProbWorker):
    """Per-token log-probs of responses under the frozen initial policy (the KL term's reference)."""

    pool, prefix = "reference", "ref"


@ray.remote(concurrency_groups={"health": 1})  # type: ignore[call-overload]  # ray's stubs lack concurrency_groups
class TeacherWorker(LogProbWorker):
    """Per-token log-probs of responses under the distillation teacher (`algorithm.distillation`):
    each token's advantage is measured against them. They travel in the samples' `ref_logprobs`
    field (the on-disk schema's name), where a job without distillation keeps the reference's."""

    pool, prefix = "teacher", "teacher"
