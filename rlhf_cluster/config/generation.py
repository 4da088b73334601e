"""The generation pool: vLLM engine settings, sampling, the mismatch probe."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from rlhf_cluster.config.base import ResourcesConfig, _Strict
from rlhf_cluster.config.episodes import AgentConfig, TurnRewardsConfig

# The built-in environments' names, for messages (`generation.environments.BUILT_IN` holds the classes;
# tests/unit/test_config_messages.py checks the two agree).
BUILT_IN_ENVIRONMENTS = ("tools", "tools_rewarded", "scripted")


class SamplingConfig(_Strict):
    """Sampling settings of the generation engine.

    The rollouts' log-probs are the engine's after all of these (vLLM's `processed_logprobs`:
    penalties, temperature, min_p, top_k, top_p, renormalised over the tokens kept; checked in
    vLLM's v1 sampler, its CPU path included), i.e. those of the distribution the tokens were drawn
    from. The learner's are the model's at `temperature` alone, so importance correction
    (`algorithm.correction`) sees what top_k, top_p, min_p and repetition_penalty change as
    rollout/learner mismatch: weights below 1 where they cut the tail, away from 1 where the
    penalty moved a token. Everything else that reads the rollouts' log-probs sees them too: a KL
    placed in the reward (to the reference), distillation's advantages (to the teacher), the
    `correction/mismatch_k3` metric and `guardrails.rollback.mismatch_above`; set its bound with
    the filters in mind (a top_k of 20 raises the mismatch on every sampled token's tail)."""

    n: int = Field(4, ge=1, description="Responses per prompt (the GRPO group size).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (the learner divides logits by it too).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    top_k: int = Field(
        0,
        ge=-1,
        description="Sample among the k likeliest tokens only; 0 or -1: off (vLLM's meaning of both; veRL "
        "rollout.top_k, TRL top_k, OpenRLHF --top_k, slime --rollout-top-k). 1 is greedy decoding.",
    )
    min_p: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Drop tokens less likely than min_p x the likeliest token's probability (after temperature); "
        "0: off (TRL min_p). Not with generation.speculative (vLLM refuses it there).",
    )
    repetition_penalty: float = Field(
        1.0,
        gt=0,
        allow_inf_nan=False,
        description="Divide the positive logits of tokens already in the prompt or the response by it (multiply "
        "the negative ones): above 1 discourages repeats; 1: off (TRL repetition_penalty, vLLM's). Unlike "
        "top_k, top_p and min_p it also changes greedy answers.",
    )
    max_new_tokens: int = Field(
        16, ge=1, description="Per-response token limit (bounds the long tail of response lengths)."
    )
    ignore_eos: bool = Field(
        False, description="Keep sampling past EOS up to max_new_tokens (benchmarks, long-response tests)."
    )


class ProbeConfig(_Strict):
    """Fixed sequences each generation worker scores after every weight sync.

    The learner publishes its fp32 log-probs of the probe with each version; the worker compares
    the engine's log-probs of the same tokens, so rollout/learner mismatch (INT8 weights, kernel
    changes, a bad reload) shows per version, before it shows in training.
    """

    sequences: int = Field(8, ge=0, description="Probe sequences (0 turns the probe off).")
    alert_factor: float = Field(
        4.0, gt=1, description="Alert when a version's probe k3 exceeds this multiple of the median so far..."
    )
    alert_floor: float = Field(
        1e-3, ge=0, description="...and this absolute k3 (so fp32 noise near zero never alerts)."
    )


class SpeculativeConfig(_Strict):
    """vLLM speculative decoding: proposals from n-grams of the context or from a draft model
    (frozen: weight syncs update the target model only)."""

    method: Literal["ngram", "draft_model"] = Field(
        ..., description="ngram: prompt lookup; draft_model: `model` proposes."
    )
    num_speculative_tokens: int = Field(3, ge=1, description="Tokens proposed per step.")
    model: str | None = Field(
        None, description="draft_model: the draft model's HF folder (same tokenizer as the policy)."
    )
    prompt_lookup_max: int = Field(4, ge=1, description="ngram: longest n-gram matched.")
    prompt_lookup_min: int = Field(1, ge=1, description="ngram: shortest n-gram matched.")

    @model_validator(mode="after")
    def _method_fields(self) -> SpeculativeConfig:
        if self.method == "draft_model" and not self.model:
            raise ValueError("generation.speculative.model: the draft_model method needs a draft model folder")
        if self.method == "ngram" and self.model:
            raise ValueError("generation.speculative.model is for method draft_model; ngram proposes from the context")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("generation.speculative.prompt_lookup_min must be <= prompt_lookup_max")
        return self

    def engine_config(self) -> dict:
        """vLLM's `speculative_config`."""
        if self.method == "ngram":
            return {
                "method": "ngram",
                "num_speculative_tokens": self.num_speculative_tokens,
                "prompt_lookup_max": self.prompt_lookup_max,
                "prompt_lookup_min": self.prompt_lookup_min,
            }
        return {"method": "draft_model", "model": self.model, "num_speculative_tokens": self.num_speculative_tokens}


class GenerationConfig(_Strict):
    """The generation pool: vLLM engines in Ray actors."""

    replicas: int = Field(1, ge=1, description="Generation workers.")
    spares: int = Field(
        0,
        ge=0,
        description="Warm spares: engines kept started and loaded with every version (they join every push) "
        "but never sampled from; a lost or hung worker is replaced by one at once, and a new spare starts behind it.",
    )
    mode: Literal["streaming", "batched"] = Field(
        "streaming",
        description="streaming: each admitted prompt goes to the engine at once and its group goes to scoring "
        "as soon as its last response finishes; new weights load in flight. batched: requests of `prompts_per_request` "
        "prompts return when their slowest response finishes, and weights load only between requests.",
    )
    in_flight_update: Literal["resume", "abort"] = Field(
        "resume",
        description="streaming: what a weight update does to unfinished responses. resume: pause at a token "
        "boundary, load, recompute their KV with the new weights and continue (tokens keep the version that sampled "
        "them); "
        "abort: drop their tokens and generate them again with the new weights.",
    )
    prompts_per_request: int = Field(4, ge=1, description="batched: prompt groups sent to a worker in one request.")
    max_num_seqs: int = Field(
        256, ge=1, description="vLLM max_num_seqs: most sequences the engine decodes in one batch."
    )
    max_num_batched_tokens: int | None = Field(
        None, ge=16, description="vLLM max_num_batched_tokens: token budget of one engine step (None: vLLM's default)."
    )
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Sampling settings.")
    quantization: Literal["none", "int8"] | list[Literal["none", "int8"]] = Field(
        "none",
        description="Rollout weights: none, or int8 = W8A8 (per-channel int8 weights, per-token int8 activations). "
        "A list sets it per replica (replica i takes entry i modulo its length), e.g. [none, int8] to serve both side "
        "by side.",
    )
    probe: ProbeConfig = Field(default_factory=ProbeConfig, description="Mismatch probe after each weight sync.")
    max_model_len: int = Field(256, ge=16, description="vLLM max_model_len.")
    kv_cache_gb: int = Field(
        1,
        ge=1,
        description="Each engine's KV cache on CPU (GiB; vLLM's kv_cache_memory_bytes, "
        "per engine; a VLLM_CPU_KVCACHE_SPACE in the environment is ignored). On GPUs "
        "`gpu_memory_utilization` sizes it.",
    )
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="vLLM memory share on GPU.")
    seed: int | None = Field(None, description="Engine seed; each worker adds its index (None: the job's `seed`).")
    resources: ResourcesConfig = Field(
        default_factory=ResourcesConfig,
        description="Per-worker resources (num_gpus: the GPUs of one engine, at least tensor_parallel_size).",
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="vLLM tensor parallelism: GPUs one engine shards its model over."
    )
    enforce_eager: bool | None = Field(
        None, description="vLLM enforce_eager: no CUDA graphs (None: eager on CPU, CUDA graphs where CUDA is present)."
    )
    enable_prefix_caching: bool = Field(
        True, description="vLLM automatic prefix caching (a group's n responses share their prompt's KV)."
    )
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="Engine weight dtype (None: model.dtype); what each weight sync sends."
    )
    speculative: SpeculativeConfig | None = Field(
        None, description="Speculative decoding (None: off). Rollout log-probs are the target model's either way."
    )
    environment: str | None = Field(
        None,
        description="Multi-turn episodes: the environment answering each model turn (`tools`, or `module:Class` "
        "of rlhf_cluster.generation.environments.Environment); None: one response per prompt.",
    )
    agent: AgentConfig | None = Field(
        None,
        description="Agent episodes: the user's agent code drives each sample through the OpenAI-compatible "
        "gateway (instead of `environment`); None: no gateway.",
    )
    max_turns: int = Field(4, ge=1, description="Multi-turn: model turns per episode at most.")
    turn_max_tokens: int | None = Field(
        None,
        ge=1,
        description="Multi-turn: tokens per model turn at most (None: what is left of sampling.max_new_tokens, "
        "which bounds the whole response, observations included).",
    )
    turn_rewards: TurnRewardsConfig = Field(
        default_factory=lambda: TurnRewardsConfig(), description="Multi-turn: per-turn rewards and the final one."
    )
    turn_stop: list[str] = Field(
        default_factory=lambda: ["</calculator>", "</python>"],
        description="Multi-turn: strings that end a model "
        "turn (kept in it), e.g. the closing tag of a tool call, so the environment answers at once.",
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other vllm.EngineArgs field, passed to the engine as is; checked against "
        "EngineArgs by the dry run and the driver (a typo names the field).",
    )

    @model_validator(mode="before")
    @classmethod
    def _an_agents_reward_counts(cls, data):
        # The reward an agent returns (an OpenEnv environment's steps') is a turn reward: with
        # `turn_rewards.combine` at its default `none` it would be dropped without a word; an agent
        # job adds it (`sum`) unless its config says how.
        if isinstance(data, dict) and data.get("agent") is not None:
            rewards = data.get("turn_rewards")
            if rewards is None or (isinstance(rewards, dict) and "combine" not in rewards):
                data = {**data, "turn_rewards": {**(rewards or {}), "combine": "sum"}}
        return data

    @field_validator("environment", mode="before")
    @classmethod
    def _environment_is_a_name(cls, value):
        # A name, never a section: say which names, not only "a valid string".
        if value is None or isinstance(value, str):
            return value
        raise ValueError(
            f"expected the name of a built-in environment ({', '.join(BUILT_IN_ENVIRONMENTS)}) "
            "or 'module:Class' of your own, e.g. `environment: tools`"
            + ("; got a mapping" if isinstance(value, dict) else "")
        )

    @field_validator("quantization", mode="before")
    @classmethod
    def _known_quantization(cls, value):
        # Checked here so that a bad value gets one message, not one per branch of the union.
        items = value if isinstance(value, list) else [value]
        if not items or any(q not in ("none", "int8") for q in items):
            raise ValueError("should be 'none' or 'int8', or a list of them with one entry per replica")
        return value

    # Engine arguments set from their own fields; engine_kwargs may not set them a second way.
    OWN_ENGINE_ARGS: ClassVar[dict[str, str]] = {
        "model": "model.path",
        "dtype": "generation.dtype",
        "seed": "generation.seed",
        "enforce_eager": "generation.enforce_eager",
        "max_model_len": "generation.max_model_len",
        "max_num_seqs": "generation.max_num_seqs",
        "max_num_batched_tokens": "generation.max_num_batched_tokens",
        "tensor_parallel_size": "generation.tensor_parallel_size",
        "gpu_memory_utilization": "generation.gpu_memory_utilization",
        "kv_cache_memory_bytes": "generation.kv_cache_gb",
        "enable_prefix_caching": "generation.enable_prefix_caching",
        "speculative_config": "generation.speculative",
        "quantization": "generation.quantization",
        "logprobs_mode": "(fixed: processed_logprobs, the learner's view of the sampled distribution)",
        "disable_log_stats": "(fixed: False, vLLM's scheduler stats feed the engine's batch metrics)",
    }

    @model_validator(mode="after")
    def _engine_settings(self) -> GenerationConfig:
        gpus, tp = self.resources.num_gpus, self.tensor_parallel_size
        if tp > 1 and 0 < gpus < tp:  # a fraction of one GPU is fine for one unsharded engine
            raise ValueError(
                f"generation.resources.num_gpus={gpus:g} is fewer than tensor_parallel_size={tp}: one engine "
                f"shards its model over {tp} GPUs, so each worker needs num_gpus >= {tp}"
            )
        if self.agent is not None and self.environment is not None:
            raise ValueError("generation.agent and generation.environment both drive episodes; set one of them")
        if self.speculative is not None and self.sampling.min_p > 0:
            raise ValueError(
                "generation.sampling.min_p: vLLM does not sample with min_p under speculative decoding "
                "(generation.speculative); set min_p 0 or speculative null"
            )
        taken = [
            f"{k} (set it with {self.OWN_ENGINE_ARGS[k]})" for k in self.engine_kwargs if k in self.OWN_ENGINE_ARGS
        ]
        if taken:
            raise ValueError(f"generation.engine_kwargs: {', '.join(taken)}")
        return self

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
