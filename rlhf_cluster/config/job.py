"""The whole job: its runtime sections (buffer, metrics, the driver loop, the cluster) and
`JobConfig`, which holds every section, relates them and derives component seeds. Weights have
their own module (`weights`), as do faults, checkpoints and guardrails (`resilience`)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from rlhf_cluster.config.algorithm import AlgorithmConfig
from rlhf_cluster.config.base import _Strict
from rlhf_cluster.config.generation import GenerationConfig
from rlhf_cluster.config.inputs import DataConfig, ModelConfig
from rlhf_cluster.config.resilience import CheckpointConfig, FaultsConfig, GuardrailsConfig
from rlhf_cluster.config.scaling import ScalingConfig, check_start_sizes
from rlhf_cluster.config.scoring import ScoringConfig, _legacy_rewards
from rlhf_cluster.config.training import CriticConfig, LearnerConfig, StageConfig
from rlhf_cluster.config.weights import WeightsConfig

# Group estimators that take turn-level returns (`generation.turn_rewards.assign: turn`).
TURN_LEVEL_ESTIMATORS = ("grpo", "dr_grpo", "rloo")


class BufferConfig(_Strict):
    """The experience buffer."""

    capacity: int = Field(4096, ge=1, description="Most samples held at once.")


class WandbConfig(_Strict):
    """A Weights & Biases run per job run (`rlhf_cluster/telemetry/trackers.py`)."""

    project: str = Field(..., min_length=1, description="The W&B project.")
    entity: str | None = Field(None, description="The W&B entity (team or user; None: the logged-in default).")
    name: str | None = Field(None, description="The run's display name (None: the job's `name`).")
    tags: list[str] = Field(default_factory=list, description="The run's tags.")
    mode: Literal["online", "offline"] = Field(
        "online", description="offline: written under RUN_DIR/wandb only, for `wandb sync` later (no network)."
    )


class MetricsConfig(_Strict):
    """Prometheus endpoints, the JSONL log and experiment trackers."""

    bind_address: str = Field("127.0.0.1", description="Address every /metrics endpoint binds to.")
    enabled: bool = Field(True, description="Serve /metrics from every actor.")
    port_range: tuple[int, int] | None = Field(
        None,
        description="[first, last]: every endpoint binds the first free port of this range (None: any free port). "
        "On Kubernetes the pods declare the range so a PodMonitor can scrape it (deploy/kuberay/).",
    )
    samples_top: int = Field(
        2,
        ge=0,
        description="Per step, samples.jsonl keeps the decoded text of this many highest- "
        "and as many lowest-reward responses (`rlhf-cluster samples RUN_DIR` prints them).",
    )
    samples_random: int = Field(2, ge=0, description="Per step, samples.jsonl also keeps this many random responses.")
    trace: bool = Field(
        True,
        description="Every actor records spans of its work (RUN_DIR/trace.jsonl; "
        "`rlhf-cluster trace RUN_DIR` writes a Chrome/Perfetto trace).",
    )
    trace_max_mb: int = Field(
        512,
        ge=1,
        description="trace.jsonl stops growing at this size (a long run keeps its first "
        "~100k steps of spans at the demo's ~4.5 KB a step).",
    )
    tensorboard: bool = Field(
        False, description="Every step's row also to TensorBoard event files in RUN_DIR/tensorboard (veRL's logger)."
    )
    wandb: WandbConfig | None = Field(
        None, description="Every step's row also to a Weights & Biases run (e.g. `{project: my-rl}`; None: off)."
    )

    @field_validator("port_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not 1024 <= value[0] <= value[1] <= 65535:
            raise ValueError(f"expected [first, last] with 1024 <= first <= last <= 65535, got {list(value)}")
        return value


class TrainConfig(_Strict):
    """The driver loop."""

    total_steps: int = Field(
        20,
        ge=1,
        description="Learner steps. With total_epochs set, the job's start sets it from the training prompts.",
    )
    total_epochs: int | None = Field(
        None,
        ge=1,
        description="Passes over the training prompts (veRL's trainer.total_epochs, TRL's num_train_epochs): the job "
        "trains total_epochs x (training prompts // prompts_per_step) steps, counted at its start after the held-out "
        "split and data.overlong_prompts (the run's config.yaml records the steps). Empty: total_steps.",
    )
    prompts_per_step: int = Field(8, ge=1, description="Prompt groups per learner step.")
    max_staleness: int = Field(
        1, ge=0, description="Max versions between a sample's weights and the learner's (0 = synchronous)."
    )
    oversample_groups: int = Field(
        0,
        ge=0,
        description="Extra prompt groups admitted beyond the staleness allowance, so a step can start once "
        "prompts_per_step groups are complete; late groups wait in the buffer for the next step (dropped and counted "
        "as stale only if they exceed max_staleness).",
    )
    progress: bool = Field(True, description="Show a progress bar.")
    record_rollouts: bool = Field(
        False,
        description="Keep every scored group (RUN_DIR/scored, Arrow, append-only: never compacted), so "
        "`rlhf-cluster replay RUN_DIR` can retrain the run's steps without generation (`--record-rollouts`).",
    )


class ClusterConfig(_Strict):
    """Where Ray runs."""

    address: str | None = Field(None, description="Ray address; empty starts a local Ray instance.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local instance (default: all).")


class JobConfig(_Strict):
    """A whole job. Load it with `load_config`; `rlhf_cluster.job.preflight.preflight` checks it as a whole."""

    name: str = Field("demo", description="Job name, used in metric labels and the run directory.")
    run_dir: str = Field("runs/demo", description="Where metrics.jsonl, the weight store and the buffer go.")
    seed: int = Field(
        0,
        description="The job's seed: every component seed left empty (data, generation, learner, critic, sft, "
        "reward_model) takes this value, and it seeds the supervised warm-up. The components draw from different "
        "generators (Python's for task and prompt order, vLLM's sampler, torch on the ranks), so one value seeds "
        "them independently. model.tiny.seed is not derived: the tiny model stands in for a fixed checkpoint.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="The policy model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Prompts: a built-in task or a file.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="The generation pool.")
    scoring: ScoringConfig = Field(
        default_factory=ScoringConfig, description="The scoring pool and the reward sources."
    )
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig, description="The RL algorithm.")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="The policy learner's ranks.")
    weights: WeightsConfig = Field(default_factory=WeightsConfig, description="The weight store and transport.")
    buffer: BufferConfig = Field(default_factory=BufferConfig, description="The experience buffer.")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus endpoints.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The driver loop.")
    faults: FaultsConfig = Field(default_factory=FaultsConfig, description="Reactions to failures.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints for exact resume.")
    guardrails: GuardrailsConfig = Field(
        default_factory=GuardrailsConfig,
        description="Best-k checkpoints and early stopping on the periodic evaluation.",
    )
    critic: CriticConfig | None = Field(
        None, description="PPO's learned critic (required by algorithm.advantage: gae)."
    )
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Where Ray runs.")
    scaling: ScalingConfig = Field(
        default_factory=ScalingConfig, description="Pool sizes while the job runs: the autoscaler, per pool."
    )
    sft: StageConfig | None = Field(None, description="Supervised fine-tuning stage (`rlhf-cluster sft`, `pipeline`).")
    reward_model: StageConfig | None = Field(
        None, description="Reward-model stage (`rlhf-cluster train-rm`, `pipeline`)."
    )

    SEEDED: ClassVar[tuple[str, ...]] = ("data", "generation", "learner", "critic", "sft", "reward_model")

    @model_validator(mode="before")
    @classmethod
    def _old_reward_spellings(cls, data: object) -> object:
        return _legacy_rewards(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _derive(self) -> JobConfig:
        # Resolved once, here: a component seed is an int from now on, for every reader
        # (a later change of `seed` does not move seeds already resolved).
        for name in self.SEEDED:
            section = getattr(self, name)
            if section is not None and section.seed is None:
                section.seed = self.seed
        if self.generation.turn_rewards.assign == "turn" and self.algorithm.advantage not in TURN_LEVEL_ESTIMATORS:
            raise ValueError(
                f"generation.turn_rewards.assign 'turn' gives each turn its group-relative return, which the "
                f"{', '.join(TURN_LEVEL_ESTIMATORS)} estimators take; algorithm.advantage "
                f"{self.algorithm.advantage!r} places rewards per token itself (use assign 'episode')"
            )
        self._check_reference_needed()
        self._check_critic_warmup()
        if self.generation.speculative is not None and (self.data.eval_sampling.min_p or 0) > 0:
            raise ValueError(  # as generation.sampling.min_p: vLLM would refuse each evaluation request
                "data.eval_sampling.min_p: vLLM does not sample with min_p under speculative decoding "
                "(generation.speculative); leave it empty or 0, or set speculative null"
            )
        s = self.scoring
        check_start_sizes(
            self.scaling.auto,
            {
                "generation": ("generation.replicas", self.generation.replicas),
                "reward": ("scoring.reward_replicas", s.reward_replicas),
                "reference": ("scoring.reference_replicas", s.reference_replicas),
                "judge": ("scoring.judge_replicas", s.judge_replicas),
            },
        )
        return self

    def _check_critic_warmup(self) -> None:
        # A warm-up as long as the job would never train the policy (veRL's trainer.critic_warmup). With
        # train.total_epochs the steps are counted at the job's start, which checks this there (`with_epoch_steps`).
        held = self.critic.freeze_policy_steps if self.critic is not None else 0
        if held and held >= self.train.total_steps and self.train.total_epochs is None:
            raise ValueError(
                f"critic.freeze_policy_steps={held} >= train.total_steps={self.train.total_steps}: the policy "
                "would never be trained (the critic warm-up holds it for the first freeze_policy_steps steps); "
                "lower critic.freeze_policy_steps or raise train.total_steps"
            )

    def _check_reference_needed(self) -> None:
        # Without reference log-probs the experience falls back to the rollout's own, so a KL term
        # would silently pull towards the behaviour policy instead of the reference: refuse it.
        if self.scoring.reference or self.learner.lora.enabled:  # with LoRA the base model is the reference
            return
        kl, needs = self.algorithm.kl, []
        if kl.placement != "none" and (kl.coef > 0 or kl.controller == "adaptive"):
            needs.append(f"algorithm.kl (placement {kl.placement!r}, coef {kl.coef}, controller {kl.controller!r})")
        if self.guardrails.rollback.kl_above is not None:
            needs.append("guardrails.rollback.kl_above")
        if kl.reference_refresh is not None:
            needs.append("algorithm.kl.reference_refresh")
        if needs:
            raise ValueError(
                f"scoring.reference is false (no reference model), but {' and '.join(needs)} need(s) the "
                f"reference's log-probs: set scoring.reference true, or algorithm.kl.coef 0 / "
                f"placement 'none'"
            )

    @property
    def engine_dtype(self) -> Literal["float32", "bfloat16", "float16"]:
        """The generation engines' weight dtype: what every weight sync sends."""
        return self.generation.dtype or self.model.dtype

    @property
    def reference_refresh_every(self) -> int:
        """Steps between refreshes of the KL reference (`algorithm.kl.reference_refresh`); 0: none."""
        refresh = self.algorithm.kl.reference_refresh
        return refresh.every_steps if refresh is not None else 0

    def resets_optimizer(self, version: int) -> bool:
        """Whether the step that publishes `version` clears the policy's optimizer state after its
        update (`algorithm.kl.reference_refresh.reset_optimizer`, at each refresh)."""
        refresh = self.algorithm.kl.reference_refresh
        return refresh is not None and refresh.reset_optimizer and version % refresh.every_steps == 0

    @property
    def samples_per_step(self) -> int:
        return self.train.prompts_per_step * self.generation.sampling.n

    def stage_output(self, stage: str) -> Path:
        """Where the `sft` or `reward_model` stage writes its model folder."""
        section = getattr(self, stage)
        return Path((section.output if section is not None else None) or Path(self.run_dir) / stage).expanduser()

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.run_dir) / "checkpoints").expanduser()

    @property
    def weights_dir(self) -> Path:
        return Path(self.weights.dir or Path(self.run_dir) / "weights").expanduser()
