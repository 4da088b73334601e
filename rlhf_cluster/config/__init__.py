"""Typed job configuration: one pydantic class per component, loaded from YAML.

One module per part of the job (`inputs`, `generation` and its `episodes`, `scoring`, `algorithm`, `training`,
`scaling`, `weights`, `job`) on `base`'s building blocks, and `loading` for files and overrides; every public name is
imported from here.

Every field has a description; unknown keys are errors (``extra="forbid"``) so a typo never
silently falls back to a default. `load_config` turns pydantic's errors into one message that
names the file, the dotted field path and what was expected.

Validation here is per field and per section. Rules that relate sections to each other, and
checks of the files a config names, live in `rlhf_cluster.job.preflight`; the driver and
`--dry-run` run them before anything starts.

Pluggable parts are typed unions picked by a `type` key: `learner.backend` (fsdp2 | deepspeed),
`weights.transport` (filesystem) and each entry of `scoring.rewards` (verifier | function |
model | judge). Adding a kind is one class added to its union.
"""

from __future__ import annotations

from rlhf_cluster.config.algorithm import (
    AlgorithmConfig,
    CorrectionConfig,
    DistillationConfig,
    KLConfig,
    LossConfig,
    ReferenceRefreshConfig,
    ShapingConfig,
)
from rlhf_cluster.config.base import ConfigError, ResourcesConfig, typed_union
from rlhf_cluster.config.episodes import AgentConfig, OpenEnvEnvironment, TurnRewardsConfig
from rlhf_cluster.config.generation import GenerationConfig, ProbeConfig, SamplingConfig, SpeculativeConfig
from rlhf_cluster.config.inputs import DataConfig, ModelConfig, PromptColumns, TinyModelConfig
from rlhf_cluster.config.job import BufferConfig, ClusterConfig, JobConfig, MetricsConfig, TrainConfig
from rlhf_cluster.config.loading import field_path, load_config
from rlhf_cluster.config.resilience import CheckpointConfig, FaultsConfig, GuardrailsConfig, RollbackConfig
from rlhf_cluster.config.scaling import AutoScaling, GenerationAutoscale, PoolAutoscale, ScalingConfig
from rlhf_cluster.config.scoring import (
    FunctionReward,
    JudgeReward,
    ModelReward,
    RewardModelSpec,
    RewardSource,
    ScoringConfig,
    VerifierReward,
)
from rlhf_cluster.config.training import (
    CriticConfig,
    DeepSpeedBackend,
    FSDP2Backend,
    LearnerBackend,
    LearnerConfig,
    LoraConfig,
    StageConfig,
    TrainingGroupConfig,
)
from rlhf_cluster.config.weights import (
    CollectiveTransport,
    DirectTransport,
    FilesystemTransport,
    WeightsConfig,
    WeightTransport,
)

__all__ = [
    "ConfigError",
    "typed_union",
    "ResourcesConfig",
    "TinyModelConfig",
    "ModelConfig",
    "PromptColumns",
    "DataConfig",
    "SamplingConfig",
    "ProbeConfig",
    "SpeculativeConfig",
    "TurnRewardsConfig",
    "AgentConfig",
    "OpenEnvEnvironment",
    "GenerationConfig",
    "RewardModelSpec",
    "VerifierReward",
    "FunctionReward",
    "JudgeReward",
    "ModelReward",
    "ScoringConfig",
    "RewardSource",
    "LossConfig",
    "KLConfig",
    "ReferenceRefreshConfig",
    "CorrectionConfig",
    "ShapingConfig",
    "AlgorithmConfig",
    "DistillationConfig",
    "FSDP2Backend",
    "DeepSpeedBackend",
    "LoraConfig",
    "TrainingGroupConfig",
    "LearnerConfig",
    "CriticConfig",
    "StageConfig",
    "LearnerBackend",
    "FilesystemTransport",
    "DirectTransport",
    "CollectiveTransport",
    "WeightsConfig",
    "BufferConfig",
    "MetricsConfig",
    "FaultsConfig",
    "CheckpointConfig",
    "RollbackConfig",
    "GuardrailsConfig",
    "TrainConfig",
    "ClusterConfig",
    "PoolAutoscale",
    "GenerationAutoscale",
    "AutoScaling",
    "ScalingConfig",
    "JobConfig",
    "WeightTransport",
    "field_path",
    "load_config",
]
