"""The generation pool: vLLM engine settings, sampling, the mismatch probe."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from rlhf_cluster.config.base import FailureBudget, ResourcesConfig, _Strict, _Typed

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


class TurnRewardsConfig(_Strict):
    """How the rewards a multi-turn environment gives each model turn (`StepResult.reward`) enter
    the episode's reward, beside the scoring pool's final one (`rlhf_cluster.rewards.turns`)."""

    combine: Literal["none", "sum", "last", "weighted"] = Field(
        "none",
        description="none: turn rewards are ignored; sum: final + the turns' sum; last: final + the last "
        "turn's; weighted: final + weight x the turns' sum.",
    )
    weight: float = Field(1.0, description="`weighted`: the factor on the turns' sum.")
    assign: Literal["episode", "turn"] = Field(
        "episode",
        description="episode: every token of the episode gets the episode's advantage; turn: each model "
        "turn's tokens get the advantage of that turn's return (the rewards from that turn on, discounted by `gamma` "
        "per turn), against the group's baseline of episode returns (GRPO, Dr.GRPO, RLOO; needs combine sum or "
        "weighted).",
    )
    gamma: float = Field(1.0, gt=0, le=1, description="`assign: turn`: the discount per turn.")

    @model_validator(mode="after")
    def _turn_credit_needs_added_rewards(self) -> TurnRewardsConfig:
        if self.assign == "turn" and self.combine not in ("sum", "weighted"):
            raise ValueError(
                f"assign 'turn' splits the episode's reward by the turns that earned it, so combine must be "
                f"'sum' or 'weighted', not {self.combine!r}"
            )
        return self


def is_loopback(address: str) -> bool:
    """Whether an address to bind is reachable only from this machine."""
    import ipaddress

    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


class OpenEnvEnvironment(_Typed):
    """An OpenEnv environment server (the `openenv-core` format: an `Environment` served by its
    `create_fastapi_app`) as the agent: per sample one episode over the server's WebSocket session
    (`rlhf_cluster/gateway/openenv.py`): reset, then the model's reply to each observation is the
    action, until the environment says done or `max_turns`; the episode's reward is the sum of the
    steps' rewards."""

    type: Literal["openenv"] = Field("openenv", description="Environment format.")
    url: str = Field(..., description="The environment server's base URL (http://host:port).")
    action_field: str = Field("message", description="The Action field the model's reply text goes into.")
    observation_field: str | None = Field(
        None,
        description="The observation field shown to the model as the user's turn (None: the whole observation, JSON).",
    )
    max_turns: int = Field(8, ge=1, description="Steps at most per episode.")
    max_tokens: int | None = Field(None, ge=1, description="Tokens per reply (None: the gateway's per-turn budget).")
    seed_from_prompt: bool = Field(
        True,
        description="reset(seed=...) from the prompt's text, so every sample of a prompt's group meets the same "
        "task (GRPO compares them); false: the environment picks.",
    )
    timeout_s: float = Field(60.0, gt=0, description="Seconds to connect, and per reset or step reply.")

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        if not url.startswith(("http://", "https://", "ws://", "wss://")):
            raise ValueError(f"{url!r}: expected the server's base URL, http://host:port")
        return url.rstrip("/")


class AgentConfig(FailureBudget):
    """Agent episodes through the OpenAI-compatible gateway (`rlhf_cluster.gateway`): each sample
    is one call of the user's agent function (or one episode of an `environment`), whose requests to
    the gateway are recorded token for token."""

    function: str | None = Field(
        None,
        description="`module:function` called as agent(base_url, api_key, messages) per sample; "
        "returns the agent's reward (a number) or None. Or set `environment`.",
    )
    environment: OpenEnvEnvironment | None = Field(
        None,
        description="A public environment format run as the agent, in place of `function`: "
        "{type: openenv, url, action_field, observation_field, max_turns}.",
    )
    timeout_s: float = Field(300.0, gt=0, description="An agent call that has not returned by then fails the request.")
    max_concurrent: int = Field(64, ge=1, description="Agent calls running at once per generation worker (threads).")
    bind_address: str = Field("127.0.0.1", description="Where each worker's gateway listens (loopback by default).")
    port: int = Field(0, ge=0, le=65535, description="Gateway port (0: any free port; each worker serves its own).")
    advertise_address: str | None = Field(
        None, description="The host agents reach the gateway at (None: bind_address, or 127.0.0.1 for a wildcard)."
    )
    token: str | None = Field(
        None, description="Bearer token every call must carry (required when bind_address is not loopback)."
    )
    model_name: str = Field("policy", description="The model id the gateway reports and accepts.")
    samples: Literal["auto", "episode", "turn"] = Field(
        "auto",
        description="What an episode trains as. `episode`: one sample, the episode's whole token sequence (model "
        "turns in the loss, what the agent added between them masked out); a request that rewrites earlier messages "
        "(strips a <think> block, summarises the history) is refused with HTTP 409, since no one sequence holds both "
        "contexts. `turn`: each model turn is its own sample, its prompt the context the engine saw for that turn "
        "(the agent's messages as sent, rendered by the chat template), its response that turn's tokens; the "
        "episode's reward goes to every turn and advantages are computed over episodes. `auto`: `episode` until an "
        "episode rewrites its history, `turn` for that episode.",
    )
    isolation: Literal["auto", "thread", "process"] = Field(
        "auto",
        description="Where each episode's agent call runs: `process` (one child process per agent.max_concurrent "
        "slot, killed at timeout_s, its memory capped at memory_mb; a crash or hang costs only its sample) or "
        "`thread` (in the worker's process: a hung call keeps its thread). `auto`: process for agents from "
        "outside this project's folder.",
    )
    memory_mb: int = Field(
        4096, ge=64, description="With isolation process: address space an agent call may add to its process."
    )
    tool_parser: str = Field(
        "hermes",
        description="How the model's tool calls are read back into OpenAI `tool_calls`: a tool parser of the "
        "installed vLLM, by the name `vllm serve --tool-call-parser` takes (hermes, llama3_json, mistral, "
        "qwen3_coder, kimi_k2, openai, ...; checked at preflight).",
    )
    reasoning_parser: str | None = Field(
        None,
        description="A reasoning parser of the installed vLLM (`vllm serve --reasoning-parser`: qwen3, "
        "deepseek_r1, ...) that splits the model's thinking into `reasoning_content`; None: none.",
    )
    image_urls: Literal["data", "any"] = Field(
        "data",
        description="A vision-language policy's `image_url` parts: `data` takes base64 data URLs "
        "(data:image/png;base64,...) only and refuses http(s) URLs with a 400; `any` also fetches http(s) URLs "
        "(from the generation worker, size-capped, 10 s timeout).",
    )
    max_image_bytes: int = Field(
        16 * 2**20,
        ge=1,
        description="An image part larger than this (encoded bytes) is refused with a 400 naming the part.",
    )

    @property
    def name(self) -> str:
        """How errors and logs name the agent."""
        if self.environment is not None:
            return f"generation.agent.environment ({self.environment.type} at {self.environment.url})"
        return f"generation.agent.function={self.function!r}"

    @model_validator(mode="after")
    def _one_agent(self) -> AgentConfig:
        if (self.function is None) == (self.environment is None):
            raise ValueError(
                "generation.agent: set one of `function` (module:function) and `environment` ({type: openenv, url})"
            )
        if self.environment is not None and self.isolation == "process":
            raise ValueError(
                "generation.agent.isolation: process runs a function in a child process; an environment's episodes "
                "run in the worker's threads (the environment itself runs in its own server): use auto or thread"
            )
        return self

    @model_validator(mode="after")
    def _token_off_loopback(self) -> AgentConfig:
        if not is_loopback(self.bind_address) and not self.token:
            raise ValueError(
                f"generation.agent.token: the gateway binds {self.bind_address!r}, reachable from other "
                "hosts, so every call must carry a token; set one (or bind 127.0.0.1)"
            )
        return self


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
