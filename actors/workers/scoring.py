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
                batch=rule.batch,
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
        limit_threads(2)
        self.settings = settings
        self.model = self._build(model_path)
        self.model_path = model_path
        if self.pool == "reference":
            self._record_version()

    def _record_version(self) -> None:
        """The reference's weight version as a gauge (`rlhf_reference_weight_version`)."""
        from rlhf_cluster.weights.export import reference_version_of  # torch: where a model is loaded anyway

        self.labels.of(m.REFERENCE_VERSION).set(reference_version_of(self.model_path))

    def _build(self, model_path: str):
        import torch

        from rlhf_cluster.scoring.reference import ReferenceModel

        s = self.settings
        return ReferenceModel(
            model_path,
            getattr(torch, s.model_dtype),
            temperature=s.temperature,
            max_tokens_per_batch=s.scoring.max_tokens_per_batch,
            quantization=s.scoring.quantization,
            min_pixels=s.pixels[0],
            max_pixels=s.pixels[1],
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
    """Per-token log-probs of responses under the KL term's reference: the initial policy, frozen,
    or its refresh (`algorithm.kl.reference_refresh`, `load_model`)."""

    pool, prefix = "reference", "ref"

    def load_model(self, model_path: str) -> str:
        """Score with the model in `model_path` from now on (a refreshed reference,
        `algorithm.kl.reference_refresh`); the folder it holds now (no load when it holds it already)."""
        if model_path != self.model_path:
            with tracing.span("reference.load", folder=model_path):
                del self.model  # the old model's memory is free before the new one loads
                _free_memory()
                self.model = self._build(model_path)
                self.model_path = model_path
            self._record_version()
        return self.model_path


@ray.remote(concurrency_groups={"health": 1})  # type: ignore[call-overload]  # ray's stubs lack concurrency_groups
class TeacherWorker(LogProbWorker):
    """Per-token log-probs of responses under the distillation teacher (`algorithm.distillation`):
    each token's advantage is measured against them. They travel in the samples' `ref_logprobs`
    field (the on-disk schema's name), where a job without distillation keeps the reference's."""

    pool, prefix = "teacher", "teacher"


def _free_memory() -> None:
    """Collect a dropped model now (its modules hold reference cycles) and give its device memory back."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
