"""Typed job configuration: one pydantic class per component, loaded from YAML.

Every field has a description; unknown keys are errors (``extra="forbid"``) so a typo never
silently falls back to a default. `load_config` turns pydantic's errors into one message that
names the file, the dotted field path and what was expected.

Validation here is per field and per section. Rules that relate sections to each other, and
checks of the files a config names, live in `rlhf_cluster.preflight`; the driver and
`--dry-run` run them before anything starts.

Pluggable parts are typed unions picked by a `type` key: `learner.backend` (fsdp2 | deepspeed),
`weights.transport` (filesystem) and each entry of `scoring.rewards` (verifier | function |
model). Adding a kind is one class added to its union.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from rlhf_cluster.algorithms.presets import PRESETS, merge_preset


class ConfigError(ValueError):
    """A config cannot be used: a file that does not read or validate, or a rule `preflight`
    refuses. The message names the file or the dotted field and what was expected."""


class _Strict(BaseModel):
    # revalidate_instances: a section passed in as an object is copied, so filling in its
    # derived seed never changes an object the caller still holds.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, revalidate_instances="always")


class _Typed(_Strict):
    """One kind of a pluggable part; its `type` names the kind.

    It equals its type name, so `learner.backend == "deepspeed"` reads as it did when the
    backend was a plain string.
    """

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return getattr(self, "type") == other
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]  # mutable, like every section


def typed_union(*kinds: type[_Typed]):
    """The annotation of a pluggable part: one of `kinds`, picked by the `type` key.

    A bare name is short for `{type: name}` (`backend: deepspeed`, also the old spelling); a
    mapping without `type` is refused with the kinds to choose from.
    """
    names = [k.model_fields["type"].default for k in kinds]

    def shorthand(value: object) -> object:
        if isinstance(value, str):
            return {"type": value}
        if isinstance(value, dict) and "type" not in value:
            raise ValueError(f"needs a `type`: one of {', '.join(names)}")
        return value

    return Annotated[Union[kinds], Field(discriminator="type"), BeforeValidator(shorthand)]


def _refuse_renamed(data: object, section: str, renamed: dict[str, str]) -> None:
    """An old field name is an error that names its new name, never silently ignored or accepted."""
    if isinstance(data, dict):
        for old, new in renamed.items():
            if old in data:
                raise ValueError(f"{section}.{old} was renamed to {section}.{new}")


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
    seed: int = Field(
        0, description="Seed of the random initialisation. Not derived from the job's `seed`: the tiny model stands "
        "in for a pretrained checkpoint, which stays the same whatever the job's seed."
    )

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
    sft_warmup_steps: int = Field(
        0, ge=0, description="Supervised warm-up steps on the task's prompts and answers before RL (0: none; cached)."
    )
    sft_warmup_lr: float = Field(3e-3, gt=0, description="Learning rate of the supervised warm-up.")
    sft_warmup_batch_size: int = Field(32, ge=1, description="Batch size of the supervised warm-up.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of generation, scoring and learner compute (fp32 master weights always)."
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: object) -> object:
        # `warmup_*` read like the learner's LR warm-up; the supervised phase has its own names.
        _refuse_renamed(data, "model", {f"warmup_{k}": f"sft_warmup_{k}" for k in ("steps", "lr", "batch_size")})
        return data


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
    seed: int | None = Field(None, description="Seed for task generation and prompt order (None: the job's `seed`).")
    shuffle: bool = Field(True, description="Shuffle prompts each epoch (seeded).")


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
    quantization: Literal["none", "int8"] | list[Literal["none", "int8"]] = Field(
        "none", description="Rollout weights: none, or int8 = W8A8 (per-channel int8 weights, per-token int8 activations). "
        "A list sets it per replica (replica i takes entry i modulo its length), e.g. [none, int8] to serve both side by side."
    )
    probe: ProbeConfig = Field(default_factory=ProbeConfig, description="Mismatch probe after each weight sync.")
    max_model_len: int = Field(256, ge=16, description="vLLM max_model_len.")
    kv_cache_gb: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE on CPU (GiB).")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="vLLM memory share on GPU.")
    seed: int | None = Field(None, description="Engine seed; each worker adds its index (None: the job's `seed`).")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Per-worker resources.")

    @field_validator("quantization", mode="before")
    @classmethod
    def _known_quantization(cls, value):
        # Checked here so that a bad value gets one message, not one per branch of the union.
        items = value if isinstance(value, list) else [value]
        if not items or any(q not in ("none", "int8") for q in items):
            raise ValueError("should be 'none' or 'int8', or a list of them with one entry per replica")
        return value

    def quantization_of(self, index: int) -> str:
        """The quantization of the replica with this index (`none` or `int8`)."""
        if isinstance(self.quantization, str):
            return self.quantization
        return self.quantization[index % len(self.quantization)]

    @property
    def weight_variants(self) -> list[str]:
        """The engine weight variants the pool serves (`full`, `int8`): what each version is made into."""
        kinds = [self.quantization] if isinstance(self.quantization, str) else self.quantization
        return sorted({"int8" if q == "int8" else "full" for q in kinds})


class RewardModelSpec(_Strict):
    """A frozen reward model served by the reward workers."""

    path: str = Field(..., description="Folder written by `rlhf-cluster train-rm` (backbone, head, tokenizer).")
    name: str = Field("rm", description="Name in reward_components (`rm/<name>`).")


def _check_function_spec(spec: str, field: str) -> str:
    # Only the shape here: importing user code belongs to the reward loader (scoring/rewards.py),
    # which preflight calls.
    module, sep, attr = spec.strip().partition(":")
    if not sep or not all(part.isidentifier() for part in f"{module}.{attr}".split(".")):
        raise ValueError(
            f"{field}={spec!r} must look like 'module:function' (an importable dotted module path, a colon, "
            "then the function name), e.g. 'my_rewards:score'"
        )
    return spec


class VerifierReward(_Typed):
    """The built-in task's verifier (`data.task`): 1 for a correct answer, plus its components."""

    type: Literal["verifier"] = Field("verifier", description="Reward source kind.")
    weight: float = Field(1.0, ge=0, description="Weight in the reward (0: only recorded in reward_components).")


class FunctionReward(_Typed):
    """A user's reward function `module:function(response, answer) -> float | dict[str, float]`,
    in place of the task's verifier (see rlhf_cluster/scoring/rewards.py for the contract)."""

    type: Literal["function"] = Field("function", description="Reward source kind.")
    function: str = Field(..., description="`module:function`, importable on every reward worker.")
    weight: float = Field(1.0, ge=0, description="Weight in the reward (0: only recorded in reward_components).")
    on_error: Literal["fail", "drop"] = Field(
        "drop", description="A call that raises, returns NaN/inf or a wrong type, or runs past timeout_s: `fail` ends "
        "the job naming the function, prompt and cause; `drop` drops the sample's whole group (counted, never trained on).",
    )
    timeout_s: float = Field(30.0, gt=0, description="Seconds one call may take before it counts as failed (it is abandoned).")

    @field_validator("function")
    @classmethod
    def _syntax(cls, spec: str) -> str:
        return _check_function_spec(spec, "function")


class ModelReward(_Typed):
    """Frozen reward models (folders written by `rlhf-cluster train-rm`), scored as one ensemble."""

    type: Literal["model"] = Field("model", description="Reward source kind.")
    models: list[RewardModelSpec] = Field(
        default_factory=list, description="The ensemble's models (empty: none yet; `rlhf-cluster pipeline` fills it)."
    )
    combine: Literal["mean", "min"] = Field("mean", description="How the ensemble's scores become one.")
    weight: float = Field(1.0, ge=0, description="Weight of the ensemble's score in the reward.")

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[RewardModelSpec]) -> list[RewardModelSpec]:
        names = [m.name for m in models]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"every model needs its own name (reward_components rm/<name>); used twice: {', '.join(twice)}")
        return models


# A sample's reward = weight x (verifier or function) + weight x ensemble(models).
RewardSource = typed_union(VerifierReward, FunctionReward, ModelReward)


class ScoringConfig(_Strict):
    """The scoring pool: reward workers (the reward sources) and frozen reference workers."""

    reward_replicas: int = Field(1, ge=1, description="RewardWorker actors.")
    reference_replicas: int = Field(1, ge=1, description="ReferenceWorker actors.")
    reference: bool = Field(True, description="Compute reference log-probs (needed for KL).")
    rewards: list[RewardSource] = Field(
        default_factory=lambda: [VerifierReward()], min_length=1,
        description="Reward sources, summed with their weights: at most one rule source (`verifier`: the task's, or "
        "`function`: yours, in its place) and at most one `model` ensemble.",
    )
    quantization: Literal["none", "int8"] = Field(
        "none", description="Frozen reward and reference models on int8 weights (per-channel W8A8) or not."
    )
    max_tokens_per_batch: int = Field(8192, ge=16, description="Token budget of one frozen-model forward (padded tokens).")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Per-worker resources.")

    @field_validator("rewards")
    @classmethod
    def _one_of_each(cls, sources: list) -> list:
        rules = [s.type for s in sources if s.type != "model"]
        if len(rules) > 1:
            raise ValueError(
                f"at most one rule source (verifier or function: a function replaces the verifier), got {', '.join(rules)}"
            )
        if sum(s.type == "model" for s in sources) > 1:
            raise ValueError("at most one `model` source: list every reward model in its `models`")
        return sources

    # ---- views for the reward workers -------------------------------------------------------
    @property
    def rule_source(self) -> VerifierReward | FunctionReward | None:
        return next((s for s in self.rewards if s.type != "model"), None)

    @property
    def model_source(self) -> ModelReward | None:
        return next((s for s in self.rewards if s.type == "model"), None)

    @property
    def reward_fn(self) -> str | None:
        """The custom reward function `module:function`, or None for the task's verifier."""
        rule = self.rule_source
        return rule.function if isinstance(rule, FunctionReward) else None

    @property
    def rule_weight(self) -> float:
        rule = self.rule_source
        return rule.weight if rule is not None else 0.0

    @property
    def reward_models(self) -> list[RewardModelSpec]:
        """The `model` source's models (a copy). Setting it replaces them, keeping the source's weight
        and combine (or adds a `model` source: weight 1, mean), as `rlhf-cluster pipeline` does."""
        model = self.model_source
        return list(model.models) if model is not None else []

    @reward_models.setter
    def reward_models(self, models: list[RewardModelSpec]) -> None:
        source = self.model_source or ModelReward()
        source = source.model_copy(update={"models": list(models)})
        self.rewards = [s for s in self.rewards if s.type != "model"] + [source]

    @property
    def reward_model_weight(self) -> float:
        model = self.model_source
        return model.weight if model is not None else 0.0

    @property
    def reward_model_combine(self) -> str:
        model = self.model_source
        return model.combine if model is not None else "mean"


def _legacy_rewards(raw: dict) -> dict:
    """The old spellings `data.reward_fn` and `scoring.{reward_models, rule_weight, reward_model_weight,
    reward_model_combine}` as `scoring.rewards`; `raw` is a job's input mapping (a copy is returned)."""
    data, scoring = raw.get("data"), raw.get("scoring")
    fn = None
    if isinstance(data, dict) and "reward_fn" in data:
        fn = data["reward_fn"]
        raw = {**raw, "data": {k: v for k, v in data.items() if k != "reward_fn"}}
    old = {k: scoring[k] for k in _LEGACY_SCORING if k in scoring} if isinstance(scoring, dict) else {}
    if fn is None and not old:
        return raw
    if scoring is not None and not isinstance(scoring, dict):
        raise ValueError("data.reward_fn is the old spelling of a `function` source: add it to scoring.rewards")
    scoring = {k: v for k, v in (scoring or {}).items() if k not in _LEGACY_SCORING}
    if "rewards" in scoring:
        raise ValueError(
            "scoring.rewards cannot be combined with the old spellings data.reward_fn, scoring.reward_models, "
            "scoring.rule_weight, scoring.reward_model_weight, scoring.reward_model_combine: write every source in scoring.rewards"
        )
    if fn is not None:
        if not isinstance(fn, str):
            raise ValueError(f"data.reward_fn must be a string 'module:function', got {fn!r}")
        rule: dict = {"type": "function", "function": _check_function_spec(fn, "data.reward_fn")}
    else:
        rule = {"type": "verifier"}
    rule["weight"] = old.get("rule_weight", 1.0)
    sources = [rule]
    if old.keys() - {"rule_weight"}:
        sources.append({"type": "model", "models": old.get("reward_models") or [],
                        "weight": old.get("reward_model_weight", 1.0), "combine": old.get("reward_model_combine", "mean")})
    return {**raw, "scoring": {**scoring, "rewards": sources}}


_LEGACY_SCORING = ("reward_models", "rule_weight", "reward_model_weight", "reward_model_combine")


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


class AlgorithmConfig(_Strict):
    """The RL algorithm: advantage estimator, loss, KL, correction and shaping.

    `preset` fills every field it names (rlhf_cluster/algorithms/presets.py); fields written
    next to it override the preset.
    """

    preset: Literal[tuple(PRESETS)] | None = Field(  # type: ignore[valid-type]
        None, description="One-line algorithm choice (a name of algorithms.presets.PRESETS); explicit fields override it."
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
            return merge_preset(PRESETS[data["preset"]], data)
        return data


class FSDP2Backend(_Typed):
    """torch FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over the ranks."""

    type: Literal["fsdp2"] = Field("fsdp2", description="Learner backend kind.")


class DeepSpeedBackend(_Typed):
    """DeepSpeed ZeRO: stage 1 shards optimizer state, 2 also gradients, 3 also parameters."""

    type: Literal["deepspeed"] = Field("deepspeed", description="Learner backend kind.")
    zero_stage: int = Field(3, ge=1, le=3, description="ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters.")
    offload_optimizer: bool = Field(
        False, description="Keep fp32 master weights and optimizer state in CPU memory; torch's AdamW steps them there."
    )
    offload_params: bool = Field(False, description="Keep parameter shards in CPU memory between uses (ZeRO stage 3 only).")
    config_file: str | None = Field(
        None, description="Your own DeepSpeed JSON, honoured except where the learner owns a setting (batch sizes, "
        "accumulation, clipping, optimizer lr/weight decay, scheduler, precision, ZeRO stage, offload): "
        "those must be absent or agree with the learner config (checked by preflight)."
    )

    @model_validator(mode="after")
    def _offload_params_needs_stage3(self) -> "DeepSpeedBackend":
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(
                f"learner.backend.offload_params needs zero_stage 3 (parameters are only partitioned in stage 3), "
                f"got zero_stage {self.zero_stage}"
            )
        return self


LearnerBackend = typed_union(FSDP2Backend, DeepSpeedBackend)


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

    SECTION: ClassVar[str] = "learner"  # the config section, for messages

    world_size: int = Field(1, ge=1, description="Ranks of the group (one torch.distributed group, sized apart from the others).")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate.")
    lr_warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up steps, then constant (the RL schedule).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (0 for RL: KL regularises).")
    max_grad_norm: float = Field(1.0, gt=0, description="Global gradient-norm clip.")
    max_tokens_per_micro_batch: int | None = Field(
        None, ge=1, description="Gradient accumulation: forward/backward at most this many padded tokens at a time "
        "(None: a whole mini-batch at once). The loss denominators stay global, so the update is the same."
    )
    seed: int | None = Field(
        None, description="Torch seed of every rank (the critic's also seeds its fresh value head; None: the job's `seed`)."
    )
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Per-rank resources.")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: object) -> object:
        # `warmup_steps` read like the supervised warm-up before RL (model.sft_warmup_steps).
        _refuse_renamed(data, cls.SECTION, {"warmup_steps": "lr_warmup_steps"})
        return data


class LearnerConfig(TrainingGroupConfig):
    """The learner: a group of FSDP2 or DeepSpeed ZeRO ranks."""

    backend: LearnerBackend = Field(
        default_factory=FSDP2Backend, description="Training backend, by `type`: fsdp2 (torch fully_shard) or deepspeed "
        "(ZeRO, with its options beside the type). `backend: fsdp2` is short for `backend: {type: fsdp2}`."
    )
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

    @model_validator(mode="before")
    @classmethod
    def _old_deepspeed_section(cls, data: object) -> object:
        # The old spelling `backend: deepspeed` + a separate `deepspeed:` section becomes one typed backend.
        if not isinstance(data, dict) or "deepspeed" not in data:
            return data
        data = dict(data)
        options = data.pop("deepspeed")
        backend = data.get("backend", "fsdp2")
        backend = {"type": backend} if isinstance(backend, str) else backend
        if not isinstance(backend, dict) or backend.get("type") != "deepspeed":
            raise ValueError(
                "learner.deepspeed sets DeepSpeed options but learner.backend is not deepspeed; write them as "
                "learner.backend: {type: deepspeed, ...} (or drop them)"
            )
        if not isinstance(options, dict):
            raise ValueError(f"learner.deepspeed must be a mapping of DeepSpeed options, got {options!r}")
        data["backend"] = {**options, **backend}
        return data


class CriticConfig(TrainingGroupConfig):
    """PPO's learned critic: a value model (causal-LM backbone + scalar head per token) trained by its
    own FSDP2 group with the clipped value loss. Needed by (and only used with) `algorithm.advantage: gae`."""

    SECTION: ClassVar[str] = "critic"

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
        return LearnerConfig(backend=FSDP2Backend(), **{name: getattr(self, name) for name in TrainingGroupConfig.model_fields})


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


WeightTransport = typed_union(FilesystemTransport, DirectTransport)


class WeightsConfig(_Strict):
    """The weight store and how versions reach generation."""

    transport: WeightTransport = Field(
        default_factory=DirectTransport, description="How versions move to generation, by `type`: direct (the "
        "default: learner to engines without disk) or filesystem (every version through the store directory; "
        "`transport: filesystem` is short for `transport: {type: filesystem}`)."
    )
    dir: str | None = Field(None, description="Store directory (default: RUN_DIR/weights).")
    keep: int = Field(3, ge=1, description="Newest versions kept on disk.")
    persist_every: int = Field(
        10, ge=1, description="With `transport: direct`, write every K-th version (and every checkpoint's) to the "
        "store on disk, off the step's critical path; the filesystem transport writes every version.")


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
    heartbeat_interval_s: float = Field(5.0, gt=0, description="Every worker of every pool is sent a heartbeat this often.")
    heartbeat_timeout_s: float = Field(
        10.0, gt=0, description="A worker that has not answered a heartbeat within this is hung (e.g. SIGSTOP): killed and replaced."
    )
    stall_timeout_s: float = Field(
        60.0, gt=0, description="A generation worker whose engine has requests running but takes no step for this long is hung."
    )
    collective_timeout_s: float = Field(
        300.0, gt=0, description="A torch.distributed collective that waits this long for a peer rank fails (no silent hang)."
    )
    preempt_grace_s: float = Field(
        120.0, gt=0, description="After SIGTERM/SIGINT, seconds to finish the step in progress and write a checkpoint "
        "before the job is torn down without one.",
    )


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
    seed: int | None = Field(None, description="Seed of data order and initialisation (None: the job's `seed`).")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Per-rank resources.")

    @model_validator(mode="after")
    def _batch_fits(self) -> "StageConfig":
        if self.batch_size % self.world_size:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by world_size={self.world_size}")
        return self


class JobConfig(_Strict):
    """A whole job. Load it with `load_config`; `rlhf_cluster.preflight.preflight` checks it as a whole."""

    name: str = Field("demo", description="Job name, used in metric labels and the run directory.")
    run_dir: str = Field("runs/demo", description="Where metrics.jsonl, the weight store and the buffer go.")
    seed: int = Field(
        0, description="The job's seed: every component seed left empty (data, generation, learner, critic, sft, "
        "reward_model) takes this value, and it seeds the supervised warm-up. The components draw from different "
        "generators (Python's for task and prompt order, vLLM's sampler, torch on the ranks), so one value seeds "
        "them independently. model.tiny.seed is not derived: the tiny model stands in for a fixed checkpoint."
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="The policy model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Prompts: a built-in task or a file.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="The generation pool.")
    scoring: ScoringConfig = Field(default_factory=ScoringConfig, description="The scoring pool and the reward sources.")
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig, description="The RL algorithm.")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="The policy learner's ranks.")
    weights: WeightsConfig = Field(default_factory=WeightsConfig, description="The weight store and transport.")
    buffer: BufferConfig = Field(default_factory=BufferConfig, description="The experience buffer.")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus endpoints.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The driver loop.")
    faults: FaultsConfig = Field(default_factory=FaultsConfig, description="Reactions to failures.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints for exact resume.")
    critic: CriticConfig | None = Field(None, description="PPO's learned critic (required by algorithm.advantage: gae).")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Where Ray runs.")
    sft: StageConfig | None = Field(None, description="Supervised fine-tuning stage (`rlhf-cluster sft`, `pipeline`).")
    reward_model: StageConfig | None = Field(None, description="Reward-model stage (`rlhf-cluster train-rm`, `pipeline`).")

    SEEDED: ClassVar[tuple[str, ...]] = ("data", "generation", "learner", "critic", "sft", "reward_model")

    @model_validator(mode="before")
    @classmethod
    def _old_reward_spellings(cls, data: object) -> object:
        return _legacy_rewards(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _derive(self) -> "JobConfig":
        # Resolved once, here: a component seed is an int from now on, for every reader
        # (a later change of `seed` does not move seeds already resolved).
        for name in self.SEEDED:
            section = getattr(self, name)
            if section is not None and section.seed is None:
                section.seed = self.seed
        return self

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


def _set_dotted(tree: dict, dotted: str, value: object) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        if key in _UNION_TAGS and isinstance(node.get(key), str):
            node[key] = {"type": node[key]}  # `backend: deepspeed`, then `--set learner.backend.zero_stage=2`
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


# Where pydantic puts a union's tag into an error location (`learner.backend.deepspeed.zero_stage`):
# the tag is not a field, so messages leave it out.
_UNION_TAGS = {
    "backend": {"fsdp2", "deepspeed"},
    "transport": {"filesystem", "direct"},
    "rewards": {"verifier", "function", "model"},
}


def field_path(loc: tuple) -> str:
    """A pydantic error location as the dotted field path a user writes (`scoring.rewards[0].function`)."""
    out = ""
    for i, part in enumerate(loc):
        owner = loc[i - 2] if i >= 2 and isinstance(loc[i - 1], int) else loc[i - 1] if i else None
        if isinstance(part, str) and part in _UNION_TAGS.get(owner, ()):
            continue
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "(top level)"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML job config, apply `key.sub=value` overrides, and validate it.

    Errors name the file and every offending field with what was expected. Rules between
    sections and checks of named files are `preflight`'s.
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
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {field_path(err['loc'])}: {err['msg']}{shown}")
        raise ConfigError(f"invalid config {source}:\n" + "\n".join(lines)) from None
