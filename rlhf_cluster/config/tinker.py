"""The Tinker-compatible server's config (`rlhf-cluster tinker CONFIG`): which base model it serves
under which name, how many client adapters its learner ranks hold, how many engines sample, and
how long sessions, futures and long polls last. Its own root, loaded like a job's
(`load_model(TinkerConfig, path, overrides)`)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from rlhf_cluster.config.base import ConfigError, ResourcesConfig, _Strict
from rlhf_cluster.config.inputs import TinyModelConfig, folder_max_length

TOKEN_PREFIX = "tml-"  # the SDK refuses, on the client side, a key without it


class TinkerModelConfig(_Strict):
    """The one base model the server trains adapters on and samples from."""

    name: str = Field(
        "rlhf-cluster/tiny",
        description="The name clients ask for (`base_model`), e.g. `Qwen/Qwen3-8B`; the cookbook's renderer lookup "
        "wants the `org/model` form.",
    )
    path: str | None = Field(
        None,
        description="Local Hugging Face folder of that model (nothing is downloaded). None: the tiny random model "
        "built in `cache_dir` (the embedded default).",
    )
    tiny: TinyModelConfig = Field(
        default_factory=lambda: TinyModelConfig(initializer_range=0.2),
        description="The tiny model's shape when `path` is None; its weights at a pretrained model's scale "
        "(`initializer_range` 0.2), so that a LoRA on its decoder layers can move its outputs. Unless set, its "
        "`max_position_embeddings` is raised to `max_context_length`.",
    )
    cache_dir: str = Field(
        "~/.cache/rlhf_cluster/models", description="Where the tiny model is built when `path` is None."
    )
    dtype: str = Field("float32", description="The learner's parameter dtype (float32, bfloat16).")
    max_context_length: int = Field(512, ge=8, description="Longest datum or prompt plus response, in tokens.")

    @field_validator("name")
    @classmethod
    def _no_colon(cls, value: str) -> str:
        if ":" in value or not value.strip():
            raise ValueError("must be a non-empty name without ':' (the SDK splits model ids on ':')")
        return value

    @model_validator(mode="after")
    def _tiny_fits_context(self) -> TinkerModelConfig:
        """The tiny model is built long enough for `max_context_length` (vLLM refuses a
        max_model_len past the model's `max_position_embeddings`), unless its length is set."""
        tiny = self.tiny
        if self.path is None and "max_position_embeddings" not in tiny.model_fields_set:
            if tiny.max_position_embeddings < self.max_context_length:
                update = {"max_position_embeddings": self.max_context_length}
                object.__setattr__(self, "tiny", tiny.model_copy(update=update))
        return self


def check_context_length(cfg: TinkerModelConfig, folder: str | Path) -> None:
    """Refuse (ConfigError) a `max_context_length` past what the model folder accepts: vLLM
    would refuse it only once the server's actors start."""
    limit = folder_max_length(folder)
    if limit is not None and cfg.max_context_length > limit:
        tiny = " or raise model.tiny.max_position_embeddings" if cfg.path is None else ""
        fix = f"set it to at most {limit}{tiny}"
        raise ConfigError(
            f"model.max_context_length: {cfg.max_context_length} is more than the model folder {folder} accepts "
            f"(max_position_embeddings {limit} in its config.json); {fix}"
        )


class TinkerLoraConfig(_Strict):
    """The adapters the learner ranks hold: one per training client."""

    max_rank: int = Field(32, ge=1, le=256, description="The largest rank a client may ask for.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; a client of rank r is scaled by alpha / r.")
    max_clients: int = Field(8, ge=1, description="Training clients held at once; a slot frees when its session ends.")


class TinkerLearnerConfig(_Strict):
    ranks: int = Field(1, ge=1, description="Learner ranks (FSDP2) every training op runs on.")
    micro_tokens: int = Field(4096, ge=16, description="Tokens per micro-batch of a forward_backward.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Ray resources of each rank.")


class TinkerSamplingConfig(_Strict):
    engines: int = Field(1, ge=1, description="vLLM engines sampling for every client (next engine per call).")
    max_adapters: int = Field(4, ge=1, description="Adapters an engine runs in one batch (vLLM's max_loras).")
    max_num_seqs: int = Field(64, ge=1, description="Sequences an engine decodes at once.")
    kv_cache_gb: int = Field(
        1, ge=1, description="Each engine's KV cache on CPU (GiB); on GPU `gpu_memory_utilization`."
    )
    gpu_memory_utilization: float = Field(0.4, gt=0, le=1, description="vLLM's memory share on GPU.")
    seed: int = Field(0, description="Engine seed (each engine adds its index); a request's own seed wins.")
    engine_kwargs: dict[str, object] = Field(default_factory=dict, description="More vLLM engine arguments.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Ray resources of each engine.")


class TinkerConfig(_Strict):
    """`rlhf-cluster tinker CONFIG`: a server that the Tinker SDK's training and sampling clients
    talk to, backed by learner ranks and generation workers on Ray."""

    host: str = Field("127.0.0.1", description="Address the HTTP server binds.")
    port: int = Field(8000, ge=0, le=65535, description="Its port (0: a free one, printed at start).")
    token: str | None = Field(
        None,
        description="The API key clients send (`X-API-Key`, the SDK's TINKER_API_KEY); it must start with `tml-`, as "
        "the SDK checks. None: read from the environment variable `token_env`.",
    )
    token_env: str = Field(
        "RLHF_TINKER_TOKEN", description="Environment variable holding the token when `token` is None."
    )
    state_dir: str = Field("runs/tinker", description="Saved states and sampler weights; kept across restarts.")
    model: TinkerModelConfig = Field(default_factory=TinkerModelConfig)
    lora: TinkerLoraConfig = Field(default_factory=TinkerLoraConfig)
    learner: TinkerLearnerConfig = Field(default_factory=TinkerLearnerConfig)
    sampling: TinkerSamplingConfig = Field(default_factory=TinkerSamplingConfig)
    session_timeout_s: float = Field(
        300.0, gt=0, description="A session without a heartbeat this long ends; its unsaved adapters go."
    )
    long_poll_s: float = Field(
        20.0,
        gt=0,
        lt=45,
        description="How long `retrieve_future` waits for a result before answering try_again "
        "(under the SDK's 45 s request timeout).",
    )
    future_ttl_s: float = Field(600.0, gt=0, description="How long a finished future's result is kept.")
    ray_address: str | None = Field(None, description="A Ray cluster to join; None starts a local one.")

    @field_validator("token")
    @classmethod
    def _token_form(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(TOKEN_PREFIX):
            raise ValueError(f"must start with {TOKEN_PREFIX!r}: the Tinker SDK refuses any other key")
        return value

    def api_key(self) -> str:
        """The token clients must send: `token`, else the environment's `token_env` (an error naming
        both when neither is set or the value lacks the SDK's prefix)."""
        key = self.token if self.token is not None else os.environ.get(self.token_env)
        if not key:
            raise ValueError(f"tinker.token: not set, and the environment variable {self.token_env} is empty")
        if not key.startswith(TOKEN_PREFIX):
            raise ValueError(
                f"{self.token_env}: must start with {TOKEN_PREFIX!r}: the Tinker SDK refuses any other key"
            )
        return key

    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser()
