"""What each actor is built from: its own config section and the few job values it needs, named.
The driver builds them from the job's config (`of`); no actor receives the whole job.

They are frozen dataclasses of the config's own pydantic sections, so Ray ships them as they are
and every field keeps its type and its validation from the job's config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from rlhf_cluster.config import (
    CriticConfig,
    GenerationConfig,
    JobConfig,
    JudgeReward,
    LoraConfig,
    MetricsConfig,
    SamplingConfig,
    ScoringConfig,
    WeightsConfig,
)
from rlhf_cluster.config.inputs import folder_max_length
from rlhf_cluster.generation.multimodal import EngineImages

if TYPE_CHECKING:
    from rlhf_cluster.learner.spec import LearnerSpec

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
    routing_replay: str  # `algorithm.routing_replay`: whether rollouts must carry the routed experts
    images: EngineImages  # what the engine takes of images, where its model is a vision-language one
    eval_sampling: SamplingConfig  # held-out answers': `generation.sampling` with `data.eval_sampling` over it

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
            cfg.algorithm.routing_replay,
            EngineImages(cfg.data.max_images_per_prompt, cfg.data.min_pixels, cfg.data.max_pixels),
            cfg.data.eval_sampling.over(cfg.generation.sampling),
        )

    def engine_images(self, model_path: str) -> EngineImages | None:
        """`images` for an engine of a vision-language model (None: a text-only one takes none)."""
        from rlhf_cluster.job.images import has_vision

        return self.images if has_vision(model_path) else None

    def routed_experts(self, model_path: str, cuda: bool) -> bool:
        """Whether the engine returns the routed experts of its rollouts: always with replay; for the
        learner's routing telemetry, of every mixture-of-experts policy an eager CPU engine serves
        (a router callback; vLLM's own capture on CUDA, which needs prefix caching, is asked for
        replay only)."""
        from rlhf_cluster.generation.vllm_process import runs_eager
        from rlhf_cluster.models.moe import is_moe

        telemetry = not cuda and runs_eager(self.generation) and is_moe(model_path)
        return self.routing_replay == "rollout" or telemetry


@dataclass(frozen=True)
class ScoringSettings:
    """A reward, reference or teacher worker's: the `scoring` section; the task's verifier
    (`data`'s); the models' dtype; and the temperature the engines sample at (reference and
    teacher log-probs are taken at it)."""

    basics: ActorBasics
    scoring: ScoringConfig
    verifier_name: str | None
    verifier_pattern: str | None
    model_dtype: DType
    temperature: float
    pixels: tuple[int | None, int | None]  # a vision-language model's images resized within (min, max)

    @classmethod
    def of(cls, cfg: JobConfig) -> ScoringSettings:
        return cls(
            ActorBasics.of(cfg),
            cfg.scoring,
            cfg.data.verifier_name,
            cfg.data.verifier_pattern,
            cfg.model.dtype,
            cfg.generation.sampling.temperature,
            (cfg.data.min_pixels, cfg.data.max_pixels),
        )


def model_max_len(folder: str) -> int | None:
    """The longest sequence a model folder's config accepts (`folder_max_length`), if it has a config."""
    path = Path(folder).expanduser()
    return folder_max_length(path) if (path / "config.json").is_file() else None


@dataclass(frozen=True)
class JudgeSettings:
    """A judge worker's: its `judge` source and the engine it runs (the job's `generation`
    section's engine settings, with room for the judge's prompt: a prompt, a response and the
    template around them)."""

    basics: ActorBasics
    judge: JudgeReward
    engine: GenerationConfig
    engine_dtype: DType
    # What a vision-language judge's engine takes a prompt: the samples' images, at its own sizes.
    images: EngineImages

    @classmethod
    def of(cls, cfg: JobConfig) -> JudgeSettings:
        judge = cfg.scoring.judge_source
        if judge is None:
            raise ValueError("this job has no judge source in scoring.rewards")
        g = cfg.generation
        group = g.sampling.n if judge.group else 1
        wanted = g.max_model_len * (group + 1) + judge.max_tokens + 256
        engine = g.model_copy(
            update={
                "max_model_len": min(wanted, model_max_len(judge.model) or wanted),
                "speculative": None,
                "agent": None,
                "environment": None,
                "quantization": judge.quantization,
                "engine_kwargs": {},
                "enable_prefix_caching": True,  # every judge prompt starts with the same template text
                # The judge decodes greedily with vLLM's plain settings, none of the policy's sampling (a
                # penalty changes greedy answers: it would push the verdict's words down; ignore_eos).
                "sampling": SamplingConfig(),
            }
        )
        return cls(ActorBasics.of(cfg), judge, engine, cfg.engine_dtype, EngineImages(cfg.data.max_images_per_prompt))


@dataclass(frozen=True)
class LearnerRankSettings:
    """A policy learner rank's: its `LearnerSpec` (the `learner` and `algorithm` sections and the
    sampling values its maths needs); how rank 0 publishes (the `weights` section, the store's
    directory, the engines' dtype and weight variants); when a version is also persisted (at
    checkpoint steps, the last step and the KL reference's refreshes); and the bound of its collectives."""

    basics: ActorBasics
    spec: LearnerSpec
    weights: WeightsConfig
    weights_dir: str
    engine_dtype: DType
    weight_variants: tuple[str, ...]
    checkpoint_every: int
    total_steps: int
    collective_timeout_s: float
    reference_refresh_every: int  # algorithm.kl.reference_refresh.every_steps (0: no refresh)

    @classmethod
    def of(cls, cfg: JobConfig) -> LearnerRankSettings:
        from rlhf_cluster.learner.spec import LearnerSpec  # torch: imported only where learners are built

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
            cfg.reference_refresh_every,
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
