"""Typed job configuration: one pydantic class per component, loaded from YAML.

Every field has a description; unknown keys are errors (``extra="forbid"``) so a typo never
silently falls back to a default. `load_config` turns pydantic's errors into one message that
names the file, the dotted field path and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(_Strict):
    """Shape of the random model built locally when `model.path` is empty."""

    architecture: Literal["qwen2", "llama"] = Field("qwen2", description="HF architecture family.")
    hidden_size: int = Field(64, ge=32, description="Model width.")
    num_layers: int = Field(2, ge=1, description="Decoder layers.")
    num_heads: int = Field(2, ge=1, description="Attention heads; head_dim = hidden/heads must be >= 32 for vLLM CPU.")
    num_kv_heads: int = Field(1, ge=1, description="Key/value heads (GQA).")
    intermediate_size: int = Field(128, ge=8, description="MLP width.")
    vocab_size: int = Field(512, ge=258, description="Upper bound of the byte-level BPE vocabulary (>= 258: 256 bytes + pad + eos); the model gets exactly the tokenizer size.")
    max_position_embeddings: int = Field(256, ge=32, description="Longest sequence the model accepts.")
    seed: int = Field(0, description="Seed of the random initialisation.")

    @model_validator(mode="after")
    def _head_dim(self) -> "TinyModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if self.hidden_size // self.num_heads < 32:
            raise ValueError("hidden_size / num_heads (head_dim) must be >= 32: vLLM's CPU attention needs it")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be divisible by num_kv_heads")
        return self


class ModelConfig(_Strict):
    """The policy model: a Hugging Face folder, or a tiny random model built on first use."""

    path: str | None = Field(None, description="HF model folder. Empty: build the tiny model into `cache_dir`.")
    cache_dir: str = Field("~/.cache/rlhf_cluster/models", description="Where built tiny models are cached.")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="Tiny model shape.")
    warmup_steps: int = Field(0, ge=0, description="Supervised warm-up steps on the task's prompts and answers before RL (0: none; cached).")
    warmup_lr: float = Field(3e-3, gt=0, description="Learning rate of the supervised warm-up.")
    warmup_batch_size: int = Field(32, ge=1, description="Batch size of the supervised warm-up.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of generation, scoring and learner compute (fp32 master weights always)."
    )


class DataConfig(_Strict):
    """Where prompts come from: a built-in task or a user's parquet/jsonl file."""

    task: Literal["arithmetic"] | None = Field(
        "arithmetic", description="Built-in task: writes its parquet file, and its verifier scores responses."
    )
    path: str | None = Field(None, description="Prompt file (.parquet or .jsonl) with columns prompt_id, prompt, answer.")
    num_prompts: int = Field(2048, ge=1, description="Prompts generated for the built-in task.")
    max_operand: int = Field(49, ge=1, le=999, description="Built-in arithmetic task: operands are drawn from 0..max_operand.")
    eval_prompts: int = Field(64, ge=0, le=256, description="Held-out prompts of the built-in task (disjoint from train).")
    eval_samples: int = Field(
        8, ge=0, description="Held-out evaluation also samples this many responses per prompt at the training "
        "temperature: their mean correctness is the policy's expected accuracy, far less noisy than greedy (0: greedy only)."
    )
    seed: int = Field(0, description="Seed for task generation and prompt order.")
    shuffle: bool = Field(True, description="Shuffle prompts each epoch (seeded).")
    reward_fn: str | None = Field(
        None,
        description="Custom reward `module:function(response, answer) -> float | dict[str, float]` (default: the task's verifier).",
    )

    @model_validator(mode="after")
    def _reward_fn_syntax(self) -> "DataConfig":
        # Only the shape here: importing user code belongs to the reward loader (scoring/rewards.py).
        if self.reward_fn is not None:
            module, sep, attr = self.reward_fn.strip().partition(":")
            if not sep or not all(part.isidentifier() for part in f"{module}.{attr}".split(".")):
                raise ValueError(
                    f"data.reward_fn={self.reward_fn!r} must look like 'module:function' "
                    "(an importable dotted module path, a colon, then the function name), e.g. 'my_rewards:score'"
                )
        return self


class SamplingConfig(_Strict):
    """Sampling settings of the generation engine."""

    n: int = Field(4, ge=1, description="Responses per prompt (the GRPO group size).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (the learner divides logits by it too).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    max_new_tokens: int = Field(16, ge=1, description="Per-response token limit (bounds the long tail of response lengths).")
    ignore_eos: bool = Field(False, description="Keep sampling past EOS up to max_new_tokens (benchmarks, long-response tests).")


class ResourcesConfig(_Strict):
    """Ray resources of one actor of a pool."""

    num_cpus: float = Field(0.0, ge=0, description="CPUs reserved per actor (0 lets tiny demos overcommit).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor.")
    custom: dict[str, float] = Field(default_factory=dict, description="Custom resources, e.g. {generation_node: 1}.")


class ProbeConfig(_Strict):
    """Fixed sequences each generation worker scores after every weight sync.

    The learner publishes its fp32 log-probs of the probe with each version; the worker compares
    the engine's log-probs of the same tokens, so rollout/learner mismatch (INT8 weights, kernel
    changes, a bad reload) shows per version, before it shows in training.
    """

    sequences: int = Field(8, ge=0, description="Probe sequences (0 turns the probe off).")
    alert_factor: float = Field(4.0, gt=1, description="Alert when a version's probe k3 exceeds this multiple of the median so far...")
    alert_floor: float = Field(1e-3, ge=0, description="...and this absolute k3 (so fp32 noise near zero never alerts).")


class GenerationConfig(_Strict):
    """The generation pool: vLLM engines in Ray actors."""

    replicas: int = Field(1, ge=1, description="Generation workers.")
    mode: Literal["streaming", "batched"] = Field(
        "streaming", description="streaming: each admitted prompt goes to the engine at once and its group goes to scoring "
        "as soon as its last response finishes; new weights load in flight. batched: requests of `prompts_per_request` "
        "prompts return when their slowest response finishes, and weights load only between requests."
    )
    in_flight_update: Literal["resume", "abort"] = Field(
        "resume", description="streaming: what a weight update does to unfinished responses. resume: pause at a token "
        "boundary, load, recompute their KV with the new weights and continue (tokens keep the version that sampled them); "
        "abort: drop their tokens and generate them again with the new weights."
    )
    prompts_per_request: int = Field(4, ge=1, description="batched: prompt groups sent to a worker in one request.")
    max_num_seqs: int = Field(256, ge=1, description="vLLM max_num_seqs: most sequences the engine decodes in one batch.")
    max_num_batched_tokens: int | None = Field(
        None, ge=16, description="vLLM max_num_batched_tokens: token budget of one engine step (None: vLLM's default)."
    )
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Sampling settings.")
    quantization: Literal["none", "int8"] = Field(
        "none", description="Rollout weights: none, or int8 = W8A8 (per-channel int8 weights, per-token int8 activations)."
    )
    probe: ProbeConfig = Field(default_factory=ProbeConfig, description="Mismatch probe after each weight sync.")
    max_model_len: int = Field(256, ge=16, description="vLLM max_model_len.")
    kv_cache_gb: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE on CPU (GiB).")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="vLLM memory share on GPU.")
    seed: int = Field(0, description="Engine seed (each worker adds its index).")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Per-worker resources.")


class ScoringConfig(_Strict):
    """The scoring pool: rule-based reward workers and frozen reference workers."""

    reward_replicas: int = Field(1, ge=1, description="RewardWorker actors.")
    reference_replicas: int = Field(1, ge=1, description="ReferenceWorker actors.")
    reference: bool = Field(True, description="Compute reference log-probs (needed for KL).")
    reward_models: list[RewardModelSpec] = Field(default_factory=list, description="Frozen reward models (an ensemble).")
    reward_model_combine: Literal["mean", "min"] = Field("mean", description="How the ensemble's scores become one.")
    reward_model_weight: float = Field(1.0, ge=0, description="Weight of the reward-model score in the reward.")
    rule_weight: float = Field(1.0, ge=0, description="Weight of the verifier / custom reward (0: reward models only).")
    quantization: Literal["none", "int8"] = Field(
        "none", description="Frozen reward and reference models on int8 weights (per-channel W8A8) or not."
    )
    max_tokens_per_batch: int = Field(8192, ge=16, description="Token budget of one frozen-model forward (padded tokens).")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Per-worker resources.")


class LossConfig(_Strict):
    """The clipped policy loss."""

    clip_low: float = Field(0.2, ge=0, description="PPO clip below 1.")
    clip_high: float = Field(0.2, ge=0, description="PPO clip above 1 (DAPO clip-higher: 0.28).")
    ratio_level: Literal["token", "sequence"] = Field("token", description="token = PPO/GRPO, sequence = GSPO.")
    aggregation: Literal["token_mean", "sequence_mean", "sequence_sum_norm"] = Field(
        "token_mean", description="How per-token losses become one number; denominators are global across ranks."
    )


class KLConfig(_Strict):
    """KL to the reference policy."""

    placement: Literal["loss", "reward", "none"] = Field("loss", description="KL in the loss (GRPO) or in the reward (PPO).")
    estimator: Literal["k1", "k2", "k3"] = Field("k3", description="KL estimator (in-reward KL always uses k1).")
    coef: float = Field(0.01, ge=0, description="KL coefficient (beta); the adaptive controller's initial value.")
    controller: Literal["fixed", "adaptive"] = Field("fixed", description="Fixed coefficient or a proportional controller.")
    target: float = Field(6.0, gt=0, description="Adaptive controller: the per-sequence KL (summed over tokens) it steers towards.")
    horizon: int = Field(10000, ge=1, description="Adaptive controller: horizon in samples.")


class CorrectionConfig(_Strict):
    """Importance correction for the rollout/learner mismatch (TIS/MIS)."""

    enabled: bool = Field(True, description="Multiply the policy loss by rollout importance weights.")
    level: Literal["token", "sequence", "geometric"] = Field("token", description="Granularity of the weight.")
    mode: Literal["truncate", "mask"] = Field("truncate", description="truncate = TIS, mask = MIS.")
    cap: float = Field(2.0, gt=0, description="Upper bound C.")
    lower: float | None = Field(None, ge=0, description="Lower bound for mask mode (None: none).")


class ShapingConfig(_Strict):
    """Reward shaping and sample filters applied before the learner."""

    overlong_buffer: int = Field(0, ge=0, description="DAPO soft overlong punishment: tokens before max_new_tokens where it starts (0: off).")
    overlong_penalty: float = Field(1.0, ge=0, description="Penalty at max_new_tokens.")
    length_target: int | None = Field(None, ge=0, description="Length penalty -coef*max(0, len-target) (None: off).")
    length_coef: float = Field(0.001, ge=0, description="Length penalty coefficient.")
    overlong_filter: bool = Field(False, description="Drop truncated responses (finish_reason=length) from the loss.")
    dynamic_sampling: bool = Field(False, description="Drop groups whose rewards are all equal; generate more instead.")


PRESETS: dict[str, dict] = {
    # Group-normalised advantages, per-sequence token mean, k3 KL in the loss (DeepSeekMath).
    "grpo": {"advantage": "grpo", "loss": {"aggregation": "sequence_mean"}, "kl": {"placement": "loss", "estimator": "k3", "coef": 0.04}},
    # No std division and a constant denominator remove GRPO's length and difficulty biases.
    "dr_grpo": {"advantage": "dr_grpo", "loss": {"aggregation": "sequence_sum_norm"}, "kl": {"placement": "none", "coef": 0.0}},
    # Clip-higher, token-level loss, no KL, overlong filtering/punishment, dynamic sampling.
    "dapo": {
        "advantage": "grpo",
        "loss": {"clip_low": 0.2, "clip_high": 0.28, "aggregation": "token_mean"},
        "kl": {"placement": "none", "coef": 0.0},
        "shaping": {"overlong_buffer": 4, "overlong_penalty": 1.0, "overlong_filter": True, "dynamic_sampling": True},
    },
    # Sequence-level, length-normalised ratio with one (tight) clip per sequence.
    "gspo": {
        "advantage": "grpo",
        "loss": {"ratio_level": "sequence", "clip_low": 3e-4, "clip_high": 4e-4, "aggregation": "sequence_mean"},
        "kl": {"placement": "none", "coef": 0.0},
    },
    # Leave-one-out baseline, KL in the reward.
    "rloo": {"advantage": "rloo", "loss": {"aggregation": "token_mean"}, "kl": {"placement": "reward", "estimator": "k1", "coef": 0.01}},
    # Per-token KL in the reward, return-to-go whitened over the whole batch.
    "reinforce_pp": {
        "advantage": "reinforce_pp",
        "loss": {"aggregation": "token_mean"},
        "kl": {"placement": "reward", "estimator": "k1", "coef": 0.01},
    },
}


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class AlgorithmConfig(_Strict):
    """The RL algorithm: advantage estimator, loss, KL, correction and shaping.

    `preset` fills every field it names; fields written next to it override the preset.
    """

    preset: Literal["grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp"] | None = Field(
        None, description="One-line algorithm choice; explicit fields override it."
    )
    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "gae"] = Field("grpo", description="Advantage estimator.")
    gamma: float = Field(1.0, gt=0, le=1, description="Discount of reinforce_pp returns and of gae.")
    lam: float = Field(0.95, ge=0, le=1, description="gae: the GAE lambda (1: Monte-Carlo returns minus values, 0: one-step TD).")
    whiten_advantages: bool = Field(
        True, description="gae: whiten the advantages over the step's valid tokens (the critic's returns stay unwhitened)."
    )
    loss: LossConfig = Field(default_factory=LossConfig, description="Policy loss.")
    kl: KLConfig = Field(default_factory=KLConfig, description="KL to the reference.")
    correction: CorrectionConfig = Field(default_factory=CorrectionConfig, description="TIS/MIS.")
    shaping: ShapingConfig = Field(default_factory=ShapingConfig, description="Reward shaping and filters.")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus coefficient.")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data):
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            return _deep_merge(PRESETS[data["preset"]], data)
        return data


class DeepSpeedConfig(_Strict):
    """Options of the DeepSpeed ZeRO learner backend (used when `learner.backend: deepspeed`)."""

    zero_stage: int = Field(3, ge=1, le=3, description="ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters.")
    offload_optimizer: bool = Field(
        False, description="Keep fp32 master weights and optimizer state in CPU memory; torch's AdamW steps them there."
    )
    offload_params: bool = Field(False, description="Keep parameter shards in CPU memory between uses (ZeRO stage 3 only).")
    config_file: str | None = Field(
        None, description="Your own DeepSpeed JSON, honoured except where the learner owns a setting (batch sizes, "
        "accumulation, clipping, optimizer lr/weight decay, scheduler, precision, ZeRO stage, offload): "
        "those must be absent or agree with the learner config."
    )

    @model_validator(mode="after")
    def _offload_params_needs_stage3(self) -> "DeepSpeedConfig":
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(
                f"learner.deepspeed.offload_params needs zero_stage 3 (parameters are only partitioned in stage 3), "
                f"got zero_stage {self.zero_stage}"
            )
        return self


class LoraConfig(_Strict):
    """LoRA adapters on the policy (peft): only they are trained, checkpointed and published (merged)."""

    rank: int = Field(0, ge=0, description="Adapter rank r (0: no LoRA, full fine-tuning).")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input (0 keeps the RL ratios exact).")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1, description="Linear layers (by name) that get adapters.",
    )

    @property
    def enabled(self) -> bool:
        return self.rank > 0


class TrainingGroupConfig(_Strict):
    """What every trained group of ranks (the policy learner, the critic) is sized and optimised by."""

    world_size: int = Field(1, ge=1, description="Ranks of the group (one torch.distributed group, sized apart from the others).")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate.")
    warmup_steps: int = Field(0, ge=0, description="Linear LR warmup steps, then constant (the RL schedule).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (0 for RL: KL regularises).")
    max_grad_norm: float = Field(1.0, gt=0, description="Global gradient-norm clip.")
    max_tokens_per_micro_batch: int | None = Field(
        None, ge=1, description="Gradient accumulation: forward/backward at most this many padded tokens at a time "
        "(None: a whole mini-batch at once). The loss denominators stay global, so the update is the same."
    )
    seed: int = Field(0, description="Torch seed of every rank (the critic's also seeds its fresh value head).")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Per-rank resources.")


class LearnerConfig(TrainingGroupConfig):
    """The learner: a group of FSDP2 or DeepSpeed ZeRO ranks."""

    backend: Literal["fsdp2", "deepspeed"] = Field(
        "fsdp2", description="Training backend: fsdp2 (torch fully_shard) or deepspeed (ZeRO, see `deepspeed`)."
    )
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="DeepSpeed backend options.")
    lora: LoraConfig = Field(
        default_factory=LoraConfig, description="LoRA on the policy (fsdp2). The reference log-probs then come from the "
        "learner's base model with the adapters disabled, so no reference workers run."
    )
    ppo_epochs: int = Field(1, ge=1, description="Passes over each step's batch.")
    mini_batches: int = Field(1, ge=1, description="Optimizer steps per epoch (the batch split evenly).")
    mixed_precision: Literal["none", "bf16"] = Field(
        "none", description="bf16: compute in bf16 (FSDP2: all-gathered bf16 params; DeepSpeed: its bf16 mode), reduce "
        "gradients and keep master weights and optimizer state in fp32."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (less memory, ~30% more compute).")

    @model_validator(mode="after")
    def _deepspeed_json_agrees(self) -> "LearnerConfig":
        # Checked at load time (and `--dry-run`), not only when the ranks start.
        if self.backend == "deepspeed" and self.deepspeed.config_file:
            from rlhf_cluster.learner.deepspeed_config import check_user_json, read_user_json

            check_user_json(read_user_json(self.deepspeed.config_file), self.deepspeed.config_file, self, self.world_size)
        return self


class CriticConfig(TrainingGroupConfig):
    """PPO's learned critic: a value model (causal-LM backbone + scalar head per token) trained by its
    own FSDP2 group with the clipped value loss. Needed by (and only used with) `algorithm.advantage: gae`."""

    init: str = Field(
        "policy", description="Where the value model starts: `policy` (the policy's backbone, a fresh small head) or "
        "the folder of a reward model written by `rlhf-cluster train-rm` (its backbone and head)."
    )
    value_clip: float | None = Field(
        0.2, gt=0, description="Clipped value loss: new values may move at most this far from the values the "
        "advantages were computed with before the loss stops pulling them (None: unclipped squared error)."
    )
    epochs: int = Field(
        1, ge=1, description="Optimizer steps of the critic on each step's batch. The value clip only acts from the "
        "second on: the first starts from exactly the values the advantages used."
    )

    def learner_settings(self) -> "LearnerConfig":
        """The critic's optimisation settings in the policy learner's terms, so the critic runs the
        same FSDP2 machinery (sharding, AdamW, clipping, micro-batching, checkpoints) with its own values."""
        return LearnerConfig(backend="fsdp2", **{name: getattr(self, name) for name in TrainingGroupConfig.model_fields})


class WeightsConfig(_Strict):
    """The weight store."""

    transport: Literal["filesystem"] = Field("filesystem", description="How versions move to generation.")
    dir: str | None = Field(None, description="Store directory (default: RUN_DIR/weights).")
    keep: int = Field(3, ge=1, description="Newest versions kept on disk.")


class BufferConfig(_Strict):
    """The experience buffer."""

    capacity: int = Field(4096, ge=1, description="Most samples held at once.")


class MetricsConfig(_Strict):
    """Prometheus endpoints and the JSONL log."""

    bind_address: str = Field("127.0.0.1", description="Address every /metrics endpoint binds to.")
    enabled: bool = Field(True, description="Serve /metrics from every actor.")


class FaultsConfig(_Strict):
    """How the job reacts to failures."""

    max_worker_restarts: int = Field(3, ge=0, description="Restarts allowed per pool (generation, reward, reference) over the job.")
    restart_backoff_s: float = Field(1.0, ge=0, description="Wait before the first restart; doubles with each restart of a pool.")
    max_learner_restarts: int = Field(2, ge=0, description="Times the learner group is rebuilt from the newest checkpoint after a rank dies.")
    max_bad_steps: int = Field(3, ge=1, description="Consecutive steps with a NaN/inf loss (skipped) before the job stops.")


class CheckpointConfig(_Strict):
    """Learner + driver checkpoints for exact resume."""

    dir: str | None = Field(None, description="Checkpoint directory (default: RUN_DIR/checkpoints).")
    every_steps: int = Field(10, ge=1, description="Checkpoint after every N learner steps (and after the last one).")
    keep: int = Field(3, ge=1, description="Newest complete checkpoints kept.")


class TrainConfig(_Strict):
    """The driver loop."""

    total_steps: int = Field(20, ge=1, description="Learner steps.")
    prompts_per_step: int = Field(8, ge=1, description="Prompt groups per learner step.")
    max_staleness: int = Field(1, ge=0, description="Max versions between a sample's weights and the learner's (0 = synchronous).")
    oversample_groups: int = Field(
        0, ge=0, description="Extra prompt groups admitted beyond the staleness allowance, so a step can start once "
        "prompts_per_step groups are complete; late groups wait in the buffer for the next step (dropped and counted "
        "as stale only if they exceed max_staleness)."
    )
    progress: bool = Field(True, description="Show a progress bar.")


class ClusterConfig(_Strict):
    """Where Ray runs."""

    address: str | None = Field(None, description="Ray address; empty starts a local Ray instance.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local instance (default: all).")


class StageConfig(_Strict):
    """A supervised stage on FSDP2 ranks: `rlhf-cluster sft` (section `sft`) or
    `rlhf-cluster train-rm` (section `reward_model`)."""

    path: str | None = Field(
        None, description="Data file (.parquet/.jsonl). sft: prompt + response, or messages (chat template applied). "
        "reward_model: prompt, chosen, rejected (optional margin). Empty: examples generated from the built-in task."
    )
    num_examples: int = Field(2048, ge=1, description="Built-in task: training examples generated (train pairs only).")
    eval_examples: int = Field(64, ge=0, description="Built-in task: held-out examples (held-out pairs), or the last rows of `path`.")
    steps: int = Field(100, ge=1, description="Optimizer steps.")
    batch_size: int = Field(32, ge=1, description="Examples (sft) or pairs (reward_model) per step, over all ranks.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (constant).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Global gradient-norm clip.")
    world_size: int = Field(1, ge=1, description="FSDP2 ranks.")
    margin: float = Field(0.0, ge=0, description="reward_model: Bradley-Terry margin added for every pair (plus a row's own `margin`).")
    output: str | None = Field(None, description="Where the trained model folder goes (default RUN_DIR/sft or RUN_DIR/reward_model).")
    seed: int = Field(0, description="Seed of data order and initialisation.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Per-rank resources.")

    @model_validator(mode="after")
    def _batch_fits(self) -> "StageConfig":
        if self.batch_size % self.world_size:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by world_size={self.world_size}")
        return self


class RewardModelSpec(_Strict):
    """A frozen reward model served by the reward workers."""

    path: str = Field(..., description="Folder written by `rlhf-cluster train-rm` (backbone, head, tokenizer).")
    name: str = Field("rm", description="Name in reward_components (`rm/<name>`).")


class JobConfig(_Strict):
    """A whole job. Load it with `load_config`."""

    name: str = Field("demo", description="Job name, used in metric labels and the run directory.")
    run_dir: str = Field("runs/demo", description="Where metrics.jsonl, the weight store and the buffer go.")
    seed: int = Field(0, description="Global seed.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    weights: WeightsConfig = Field(default_factory=WeightsConfig)
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    critic: CriticConfig | None = Field(None, description="PPO's learned critic (required by algorithm.advantage: gae).")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    sft: StageConfig | None = Field(None, description="Supervised fine-tuning stage (`rlhf-cluster sft`, `pipeline`).")
    reward_model: StageConfig | None = Field(None, description="Reward-model stage (`rlhf-cluster train-rm`, `pipeline`).")

    @model_validator(mode="after")
    def _consistent(self) -> "JobConfig":
        if self.data.task is None and self.data.path is None:
            raise ValueError("data: set `task` (a built-in task) or `path` (a prompt file)")
        t = self.train
        need = ((t.max_staleness + 1) * t.prompts_per_step + t.oversample_groups) * self.generation.sampling.n
        if self.buffer.capacity < need:
            raise ValueError(
                f"buffer.capacity={self.buffer.capacity} is smaller than "
                f"((max_staleness+1) * prompts_per_step + oversample_groups) * n = {need}"
            )
        if self.algorithm.shaping.overlong_buffer >= self.generation.sampling.max_new_tokens:
            raise ValueError("algorithm.shaping.overlong_buffer must be smaller than generation.sampling.max_new_tokens")
        if self.learner.lora.enabled:
            if self.learner.backend != "fsdp2":
                raise ValueError(f"learner.lora needs learner.backend: fsdp2 (got {self.learner.backend})")
            if self.algorithm.kl.placement == "reward":
                raise ValueError(
                    "learner.lora with algorithm.kl.placement=reward: with LoRA the reference log-probs are computed by "
                    "the learner at train time, after rewards are final; use kl.placement loss or none"
                )
        if self.algorithm.advantage in ("grpo", "dr_grpo", "rloo") and self.generation.sampling.n < 2:
            raise ValueError(f"algorithm.advantage={self.algorithm.advantage} needs generation.sampling.n >= 2")
        if self.algorithm.advantage == "gae" and self.critic is None:
            raise ValueError(
                "algorithm.advantage=gae needs a learned critic: add a `critic` section (e.g. `critic: {init: policy}`), "
                "or choose an advantage without one (grpo, dr_grpo, rloo, reinforce_pp)"
            )
        # Each step's samples are dealt round-robin to the learner ranks; an uneven split gives
        # ranks different batch sizes (and the global loss denominators assume equal shares).
        batch = self.samples_per_step
        groups = [("learner.world_size", self.learner.world_size)]
        if self.critic is not None:
            groups.append(("critic.world_size", self.critic.world_size))
        for field, world in groups:
            if batch % world:
                raise ValueError(
                    f"the step batch train.prompts_per_step * generation.sampling.n = "
                    f"{self.train.prompts_per_step} * {self.generation.sampling.n} = {batch} is not divisible by "
                    f"{field}={world}; change one of them so every rank gets the same number of samples"
                )
        world = self.learner.world_size
        if batch // world < self.learner.mini_batches:
            raise ValueError(
                f"learner.mini_batches={self.learner.mini_batches} is larger than the samples each rank gets per step "
                f"(train.prompts_per_step * generation.sampling.n / learner.world_size = {batch // world}); "
                "a mini-batch would be empty"
            )
        return self

    def warnings(self) -> list[str]:
        """Settings that are allowed but usually a mistake; the driver logs them, `--dry-run` prints them."""
        out = []
        if self.critic is not None and self.algorithm.advantage != "gae":
            out.append(
                f"a critic section is set but algorithm.advantage={self.algorithm.advantage}: only gae uses the critic, "
                "so no critic is started"
            )
        if self.learner.backend != "deepspeed" and self.learner.deepspeed != DeepSpeedConfig():
            out.append(
                f"learner.deepspeed is set but learner.backend={self.learner.backend}: the DeepSpeed options are "
                "ignored (set learner.backend: deepspeed to use them)"
            )
        if self.generation.quantization == "int8" and not self.algorithm.correction.enabled:
            out.append(
                "generation.quantization=int8 with algorithm.correction.enabled=false: samples from int8 weights "
                "are trained on without importance correction, so the gradient carries the quantization mismatch"
            )
        if self.train.oversample_groups and self.train.max_staleness == 0:
            out.append(
                "train.oversample_groups > 0 with train.max_staleness = 0: a late group is always one version old "
                "by the next step, so every over-sampled group is generated and then dropped as stale"
            )
        if self.generation.mode == "batched" and self.generation.in_flight_update != "resume":
            out.append("generation.in_flight_update applies to mode streaming only; batched loads weights between requests")
        return out

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


class ConfigError(ValueError):
    """A config file could not be read or does not validate; the message names file and field."""


def _set_dotted(tree: dict, dotted: str, value: object) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML job config, apply `key.sub=value` overrides, and validate it.

    Errors name the file and every offending field with what was expected.
    """
    raw: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {source} does not exist")
        try:
            raw = yaml.safe_load(file.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {source} is not valid YAML: {exc}") from exc
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {source} must hold a mapping at the top level, got {type(raw).__name__}")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, value = item.split("=", 1)
        _set_dotted(raw, key.strip(), yaml.safe_load(value))
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {where}: {err['msg']}{shown}")
        raise ConfigError(f"invalid config {source}:\n" + "\n".join(lines)) from None
