"""What each actor is built from: its own config section and the few job values it needs, named.
The driver builds them from the job's config (`of`); no actor receives the whole job.

They are frozen dataclasses of the config's own pydantic sections, so Ray ships them as they are
and every field keeps its type and its validation from the job's config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from rlhf_cluster.config import (
    CriticConfig,
    GenerationConfig,
    JobConfig,
    LoraConfig,
    MetricsConfig,
    ScoringConfig,
    WeightsConfig,
)

if TYPE_CHECKING:
    from rlhf_cluster.learner.base import LearnerSpec

DType = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class ActorBasics:
    """What every actor of a job shares: the job's name (its metrics' `job` label) and the metrics
    settings (the /metrics endpoint, tracing)."""

    job: str
    metrics: MetricsConfig

    @classmethod
    def of(cls, cfg: JobConfig) -> ActorBasics:
        return cls(cfg.name, cfg.metrics)


@dataclass(frozen=True)
class GenerationSettings:
    """A generation worker's: the `generation` section; how versions reach it (the `weights`
    section and the store's directory); the dtype the engine holds; and, when the learner sends
    LoRA adapters alone, the adapters' settings."""

    basics: ActorBasics
    generation: GenerationConfig
    weights: WeightsConfig
    weights_dir: str
    engine_dtype: DType
    adapters: LoraConfig | None

    @classmethod
    def of(cls, cfg: JobConfig) -> GenerationSettings:
        lora = cfg.learner.lora
        return cls(
            ActorBasics.of(cfg),
            cfg.generation,
            cfg.weights,
            str(cfg.weights_dir),
            cfg.engine_dtype,
            lora if lora.adapters_only else None,
        )


@dataclass(frozen=True)
class ScoringSettings:
    """A reward or reference worker's: the `scoring` section; the task's verifier (`data`'s); the
    models' dtype; and the temperature the engines sample at (reference log-probs are taken at it)."""

    basics: ActorBasics
    scoring: ScoringConfig
    verifier_name: str | None
    verifier_pattern: str | None
    model_dtype: DType
    temperature: float

    @classmethod
    def of(cls, cfg: JobConfig) -> ScoringSettings:
        return cls(
            ActorBasics.of(cfg),
            cfg.scoring,
            cfg.data.verifier_name,
            cfg.data.verifier_pattern,
            cfg.model.dtype,
            cfg.generation.sampling.temperature,
        )


@dataclass(frozen=True)
class LearnerRankSettings:
    """A policy learner rank's: its `LearnerSpec` (the `learner` and `algorithm` sections and the
    sampling values its maths needs); how rank 0 publishes (the `weights` section, the store's
    directory, the engines' dtype and weight variants); when a version is also persisted (at
    checkpoint steps and the last step); and the bound of its collectives."""

    basics: ActorBasics
    spec: LearnerSpec
    weights: WeightsConfig
    weights_dir: str
    engine_dtype: DType
    weight_variants: tuple[str, ...]
    checkpoint_every: int
    total_steps: int
    collective_timeout_s: float

    @classmethod
    def of(cls, cfg: JobConfig) -> LearnerRankSettings:
        from rlhf_cluster.learner.base import LearnerSpec  # torch: imported only where learners are built

        return cls(
            ActorBasics.of(cfg),
            LearnerSpec.of_policy(cfg),
            cfg.weights,
            str(cfg.weights_dir),
            cfg.engine_dtype,
            tuple(cfg.generation.weight_variants),
            cfg.checkpoint.every_steps,
            cfg.train.total_steps,
            cfg.faults.collective_timeout_s,
        )


@dataclass(frozen=True)
class CriticRankSettings:
    """A critic rank's: the `critic` section, the learner spec its ranks train with
    (`critic_spec`), and the bound of its collectives."""

    basics: ActorBasics
    critic: CriticConfig
    spec: LearnerSpec
    collective_timeout_s: float

    @classmethod
    def of(cls, cfg: JobConfig) -> CriticRankSettings:
        from rlhf_cluster.learner.critic import critic_spec  # torch: imported only where learners are built

        critic, spec = critic_spec(cfg)
        return cls(ActorBasics.of(cfg), critic, spec, cfg.faults.collective_timeout_s)
