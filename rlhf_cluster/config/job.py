"""The whole job: its runtime sections (weights, buffer, metrics, faults, checkpoints, the driver
loop, the cluster) and `JobConfig`, which holds every section and derives component seeds."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, TypeAlias

from pydantic import Field, field_validator, model_validator

from rlhf_cluster.config.algorithm import AlgorithmConfig
from rlhf_cluster.config.base import _Strict, _Typed, typed_union
from rlhf_cluster.config.generation import GenerationConfig
from rlhf_cluster.config.inputs import DataConfig, ModelConfig
from rlhf_cluster.config.scaling import ScalingConfig, check_start_sizes
from rlhf_cluster.config.scoring import ScoringConfig, _legacy_rewards
from rlhf_cluster.config.training import CriticConfig, LearnerConfig, StageConfig

# Group estimators that take turn-level returns (`generation.turn_rewards.assign: turn`).
TURN_LEVEL_ESTIMATORS = ("grpo", "dr_grpo", "rloo")


class FilesystemTransport(_Typed):
    """Every version is written to the weight store's directory; generation workers load it from there."""

    type: Literal["filesystem"] = Field("filesystem", description="Weight transport kind.")


class DirectTransport(_Typed):
    """Each version goes from the learner's rank 0 straight into every generation engine, without
    disk: layer-aligned buckets of engine-dtype bytes (int8 quantised once on the sender) in Ray's
    shared-memory object store, each checked by its checksum before the engine loads any of them.
    The store on disk then keeps only every `weights.persist_every`-th version (recovery, late joiners)."""

    type: Literal["direct"] = Field("direct", description="Weight transport kind.")
    bucket_mb: float = Field(64.0, gt=0, description="Bucket size in MiB (a bucket never splits a decoder layer).")
    delta: Literal["none", "sparse"] = Field(
        "none",
        description="`sparse`: full-precision engines get only the elements that changed since the previous "
        "version (indices + values; a tensor whole where that is smaller), rebuilt on the engine and proven by the "
        "fingerprint of the full weights. Int8 engines still get every version whole.",
    )
    full_every: int = Field(
        10,
        ge=1,
        description="With `delta: sparse`, every K-th version (and every one also "
        "written to the store) goes whole; an engine that missed a delta rebuilds from the "
        "newest whole version and the deltas since.",
    )
    senders: Literal["rank0", "every_rank"] = Field(
        "rank0",
        description="`every_rank`: each FSDP2 learner rank casts, checksums and puts its share of a version "
        "(decoder layers dealt by bytes; engines assemble and prove the whole); `rank0`: rank 0 sends everything. "
        "Versions also written to the store, sparse deltas and LoRA go from rank 0. Not the default: on a 2-core CPU "
        "machine one sender already uses every core (two FSDP2 ranks: 1.06-1.07x rank 0's push time, "
        "benchmarks/weight_sync.py --learner-ranks 2); it is for nodes where each rank has its own device-to-host "
        "link.",
    )


class CollectiveTransport(_Typed):
    """Each version is broadcast from the learner's rank 0 to every generation engine over a
    process group of its own (rank 0 and the engines; rebuilt when an engine joins, leaves or is
    replaced): NCCL between GPUs, gloo on CPU. The same layer-aligned, checksummed buckets as
    `direct`, one broadcast per bucket, with the sender taking part in every push. The store on
    disk keeps every `weights.persist_every`-th version, as with `direct`."""

    type: Literal["collective"] = Field("collective", description="Weight transport kind.")
    bucket_mb: float = Field(64.0, gt=0, description="Bucket size in MiB (one broadcast each; never splits a layer).")
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto",
        description="The group's backend: `auto` is nccl where the learner has CUDA, else gloo. Every engine "
        "of an nccl group needs a GPU of its own.",
    )
    timeout_s: float = Field(
        60.0, gt=0, description="Bound on building the group and on each broadcast (a member that died or hung)."
    )


if TYPE_CHECKING:  # the union alone: mypy cannot read the Annotated union typed_union builds at run time
    WeightTransport: TypeAlias = FilesystemTransport | DirectTransport | CollectiveTransport
else:
    WeightTransport = typed_union(FilesystemTransport, DirectTransport, CollectiveTransport)


class WeightsConfig(_Strict):
    """The weight store and how versions reach generation."""

    transport: WeightTransport = Field(
        default_factory=DirectTransport,
        description="How versions move to generation, by `type`: direct (the "
        "default: learner to engines without disk, through Ray's object store), collective (a broadcast group of "
        "the learner's rank 0 and the engines: nccl or gloo) or filesystem (every version through the store directory; "
        "`transport: filesystem` is short for `transport: {type: filesystem}`).",
    )
    dir: str | None = Field(None, description="Store directory (default: RUN_DIR/weights).")
    keep: int = Field(3, ge=1, description="Newest versions kept on disk.")
    persist_every: int = Field(
        10,
        ge=1,
        description="With `transport: direct` or `collective`, write every K-th version (and every "
        "checkpoint's) to the store on disk, off the step's critical path; the filesystem transport writes "
        "every version.",
    )


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


class FaultsConfig(_Strict):
    """How the job reacts to failures."""

    max_worker_restarts: int = Field(
        3, ge=0, description="Restarts allowed per pool (generation, reward, reference) over the job."
    )
    restart_backoff_s: float = Field(
        1.0, ge=0, description="Wait before the first restart; doubles with each restart of a pool."
    )
    max_learner_restarts: int = Field(
        2, ge=0, description="Times the learner group is rebuilt from the newest checkpoint after a rank dies."
    )
    max_bad_steps: int = Field(
        3, ge=1, description="Consecutive steps with a NaN/inf loss (skipped) before the job stops."
    )
    heartbeat_interval_s: float = Field(
        5.0, gt=0, description="Every worker of every pool is sent a heartbeat this often."
    )
    heartbeat_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A worker that has not answered a heartbeat within this is hung (e.g. SIGSTOP): killed and "
        "replaced.",
    )
    stall_timeout_s: float = Field(
        60.0,
        gt=0,
        description="A generation worker whose engine has requests running but takes no step for this long is hung.",
    )
    collective_timeout_s: float = Field(
        300.0,
        gt=0,
        description="A torch.distributed collective that waits this long for a peer rank fails (no silent hang).",
    )
    preempt_grace_s: float = Field(
        120.0,
        gt=0,
        description="After SIGTERM/SIGINT, seconds to finish the step in progress and write a checkpoint "
        "before the job is torn down without one.",
    )
    elastic: bool = Field(
        False,
        description="When the learner is built (at the start, on resume, or rebuilt after a rank died or "
        "hung) and its learner.world_size ranks cannot all be placed (a node is gone), continue on the most ranks that "
        "can be (the checkpoint is resharded; the batch must split evenly over them). FSDP2 only.",
    )
    elastic_wait_s: float = Field(
        30.0,
        gt=0,
        description="With `elastic`, how long a rebuilt learner waits for all its ranks to be placed "
        "before it continues on fewer.",
    )
    progress_timeout_s: float = Field(
        3600.0,
        gt=0,
        description="Ceiling of the no-progress watchdog: a step loop that has waited this long for its "
        "batch fails the job with why (groups dropped and for what, the buffer, requests in flight) instead of "
        "spinning. Before the first step this is the bound; after, the bound is progress_timeout_factor x the "
        "slowest recent step, at least 600 s and at most this.",
    )
    progress_timeout_factor: float = Field(
        10.0,
        ge=1,
        description="The no-progress watchdog's bound in multiples of the slowest of the last 20 steps "
        "(wait for the batch included), between 600 s and progress_timeout_s.",
    )


class CheckpointConfig(_Strict):
    """Learner + driver checkpoints for exact resume."""

    dir: str | None = Field(None, description="Checkpoint directory (default: RUN_DIR/checkpoints).")
    every_steps: int = Field(10, ge=1, description="Checkpoint after every N learner steps (and after the last one).")
    keep: int = Field(3, ge=1, description="Newest complete checkpoints kept.")


class RollbackConfig(_Strict):
    """Conditions that roll a run back to its last good checkpoint, with adjusted settings
    (`guardrails.rollback`; every condition unset: off)."""

    kl_above: float | None = Field(None, gt=0, description="A step's KL to the reference (`kl`) above this.")
    mismatch_above: float | None = Field(
        None, gt=0, description="A step's engine/learner mismatch (`correction/mismatch_k3`) above this."
    )
    entropy_below: float | None = Field(None, gt=0, description="A step's policy entropy below this (collapse).")
    response_length_above: float | None = Field(
        None, gt=0, description="A step's mean response length above this many tokens (runaway)."
    )
    eval_drop: float | None = Field(
        None, gt=0, description="An evaluation's guardrails.metric this far worse than the best so far."
    )
    max_rollbacks: int = Field(
        2, ge=1, description="Rollbacks allowed over the run; one more condition ends it with an error."
    )
    lr_factor: float = Field(0.5, gt=0, le=1, description="Each rollback multiplies learner.lr by this.")
    kl_coef_factor: float = Field(2.0, ge=1, description="Each rollback multiplies algorithm.kl.coef (beta) by this.")

    @property
    def active(self) -> bool:
        return any(
            getattr(self, name) is not None
            for name in ("kl_above", "mismatch_above", "entropy_below", "response_length_above", "eval_drop")
        )


class GuardrailsConfig(_Strict):
    """Actions on the periodic evaluation (`data.eval_every_steps`): keep the best checkpoints by an
    eval metric, and stop early when it stops improving or reaches a target (`rlhf_cluster.job.guardrails`)."""

    metric: str = Field(
        "eval_accuracy",
        description="The evaluation's column watched: eval_accuracy, eval_sampled_accuracy, "
        "eval_reward_mean, eval_pass@<k> (k in data.eval_pass_k) or eval_accuracy/<source>.",
    )
    higher_is_better: bool = Field(True, description="False: the metric improves as it falls.")
    min_delta: float = Field(0.0, ge=0.0, description="An evaluation improves on the best only by more than this.")
    keep_best: int = Field(
        0,
        ge=0,
        description="Also keep the k checkpoints with the best metric, besides the checkpoint.keep newest; an "
        "evaluation that improves on the best so far is checkpointed at once. 0: off.",
    )
    patience: int | None = Field(
        None, ge=1, description="Stop (checkpointed, evaluated) after this many evaluations without improvement."
    )
    target: float | None = Field(None, description="Stop (checkpointed, evaluated) once the metric reaches this value.")
    rollback: RollbackConfig = Field(default_factory=RollbackConfig, description="Automatic rollback conditions.")

    @property
    def active(self) -> bool:
        """Whether anything acts on the periodic evaluation."""
        return (
            bool(self.keep_best)
            or self.patience is not None
            or self.target is not None
            or self.rollback.eval_drop is not None
        )


class TrainConfig(_Strict):
    """The driver loop."""

    total_steps: int = Field(20, ge=1, description="Learner steps.")
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
        # A warm-up as long as the job would never train the policy (veRL's trainer.critic_warmup).
        held = self.critic.freeze_policy_steps if self.critic is not None else 0
        if held and held >= self.train.total_steps:
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
