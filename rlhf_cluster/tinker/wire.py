"""The JSON bodies the Tinker server reads (requests; what it writes is `replies`), as pydantic
models whose field names and `type` literals are those of the SDK's own types (tinker 0.38.0,
`tinker/types/`), and the converters to the typed records backends take.

Requests ignore fields they do not know, so a newer SDK's additions pass. `parse_body` turns a
malformed body or a value out of range (a beta of 1, a top_p of 0) into a `WireError` naming the
field (400); the converters refuse, the same way, what the server does not serve. The SDK
sends every request with `exclude_none=True`, so an absent field means its default."""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rlhf_cluster.tinker import records
from rlhf_cluster.tinker.proto import WireError

M = TypeVar("M", bound=BaseModel)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


def parse_body(cls: type[M], body: bytes | str | dict[str, Any]) -> M:
    """A request body as `cls`; bad JSON or a field of the wrong shape raises `WireError` naming it."""
    data: Any = body
    if isinstance(body, bytes | str):
        try:
            data = json.loads(body or b"{}")
        except ValueError as e:
            raise WireError("body", f"expected a JSON object ({e})") from e
    if not isinstance(data, dict):
        raise WireError("body", f"expected a JSON object, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise WireError(where, f"{first['msg']} (in {cls.__name__})") from e


# ---- requests ----


class ClientConfigRequest(_Request):
    sdk_version: str = ""


class CreateSessionRequest(_Request):
    tags: list[str] = []
    user_metadata: dict[str, Any] | None = None
    sdk_version: str = ""
    project_id: str | None = None
    display_name: str | None = None
    type: Literal["create_session"] = "create_session"


class SessionHeartbeatRequest(_Request):
    session_id: str
    type: Literal["session_heartbeat"] = "session_heartbeat"


class LoraConfig(_Request):
    rank: int = Field(ge=1)
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class OptimizerConfig(BaseModel):
    """The optimizer family a model is created with; only `adamw` is served."""

    model_config = ConfigDict(extra="ignore")
    type: str = "adamw"


class CreateModelRequest(_Request):
    session_id: str
    model_seq_id: int
    base_model: str
    user_metadata: dict[str, Any] | None = None
    lora_config: LoraConfig | None = None
    optimizer_config: OptimizerConfig = OptimizerConfig()
    type: Literal["create_model"] = "create_model"


class GetInfoRequest(_Request):
    model_id: str
    type: Literal["get_info"] = "get_info"


class AdamParams(_Request):
    learning_rate: float = Field(1e-4, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-12, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip_norm: float = Field(0.0, ge=0)  # 0: no clipping


class OptimStepRequest(_Request):
    """The SDK writes Adam's parameters as `adam_params` and any other family's as `optimizer_params`."""

    adam_params: AdamParams | None = None
    optimizer_params: dict[str, Any] | None = None
    model_id: str
    seq_id: int | None = None
    type: Literal["optim_step"] = "optim_step"


class SaveWeightsRequest(_Request):
    model_id: str
    path: str | None = None
    seq_id: int | None = None
    ttl_seconds: int | None = None
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None
    type: Literal["save_weights"] = "save_weights"


class LoadWeightsRequest(_Request):
    """Two forms: into an existing model (`model_id`, `seq_id`), or create-via-load (`session_id`,
    `model_seq_id`; the model id is then `f"{session_id}:train:{model_seq_id}"`, as the SDK builds it)."""

    model_id: str | None = None
    seq_id: int | None = None
    session_id: str | None = None
    model_seq_id: int | None = None
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None
    path: str
    optimizer: bool
    optimizer_config: OptimizerConfig | None = None
    weights_access_token: str | None = None
    type: Literal["load_weights"] = "load_weights"

    @model_validator(mode="after")
    def _one_form(self) -> LoadWeightsRequest:
        if self.model_id is not None and self.session_id is not None:
            raise WireError("session_id", "give either model_id (load into a model) or session_id, not both")
        if self.model_id is None and (self.session_id is None or self.model_seq_id is None):
            raise WireError("model_id", "expected model_id, or session_id with model_seq_id (create-via-load)")
        if self.optimizer_config is not None and self.optimizer_config.type != "adamw":
            raise WireError("optimizer_config.type", f"only adamw is served, got {self.optimizer_config.type!r}")
        return self

    @property
    def creates_model(self) -> bool:
        return self.model_id is None

    @property
    def target_model_id(self) -> str:
        """The model the weights land on: the given one, or the one create-via-load makes."""
        return self.model_id or f"{self.session_id}:train:{self.model_seq_id}"


class SaveWeightsForSamplerRequest(_Request):
    model_id: str
    path: str | None = None
    sampling_session_seq_id: int | None = None
    kind: Literal["snapshot", "inflight"] = "snapshot"
    seq_id: int | None = None
    ttl_seconds: int | None = None
    user_metadata: dict[str, str] | None = None
    type: Literal["save_weights_for_sampler"] = "save_weights_for_sampler"


class CreateSamplingSessionRequest(_Request):
    session_id: str
    sampling_session_seq_id: int
    base_model: str | None = None
    model_path: str | None = None
    type: Literal["create_sampling_session"] = "create_sampling_session"


class ModelInputChunk(_Request):
    """One chunk of a prompt; only `encoded_text` chunks (with `tokens`) are served."""

    type: str = "encoded_text"
    tokens: list[int] | None = None


class ModelInput(_Request):
    chunks: list[ModelInputChunk]


class SamplingParams(_Request):
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: float = Field(1.0, ge=0)
    top_k: int = -1
    top_p: float = Field(1.0, gt=0, le=1)


class SampleRequest(_Request):
    num_samples: int = Field(1, ge=1)
    prompt: ModelInput
    sampling_params: SamplingParams
    base_model: str | None = None
    model_path: str | None = None
    sampling_session_id: str | None = None
    seq_id: int | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    target_prompt_logprobs: dict[str, Any] | None = None
    prompt_alt_tokens_k: int = 0
    prompt_logprobs_last_n: int | None = None
    record_stability_info: bool | None = None
    type: Literal["sample"] = "sample"


class FutureRetrieveRequest(_Request):
    request_id: str
    allow_metadata_only: bool = False


class WeightsInfoRequest(_Request):
    tinker_path: str


class CancelFutureRequest(_Request):
    request_id: str


class UnloadModelRequest(_Request):
    model_id: str
    type: Literal["unload_model"] = "unload_model"


# ---- converters to records ----


def adam_params(req: OptimStepRequest) -> records.AdamParams:
    if req.optimizer_params is not None:
        family = req.optimizer_params.get("type")
        raise WireError("optimizer_params", f"only Adam (adam_params) is served, got optimizer type {family!r}")
    if req.adam_params is None:
        raise WireError("adam_params", "expected Adam's parameters")
    return records.AdamParams(**req.adam_params.model_dump())


def lora_spec(req: CreateModelRequest) -> records.LoraSpec:
    if req.optimizer_config.type != "adamw":
        raise WireError("optimizer_config.type", f"only adamw is served, got {req.optimizer_config.type!r}")
    if req.lora_config is None:
        raise WireError("lora_config", "full fine-tuning is not served; expected a LoRA config")
    return records.LoraSpec(**req.lora_config.model_dump())


def prompt_tokens(model_input: ModelInput, where: str = "prompt") -> list[int]:
    """The prompt's token ids; any chunk but encoded text raises `WireError` naming it."""
    tokens: list[int] = []
    for i, chunk in enumerate(model_input.chunks):
        if chunk.type != "encoded_text" or chunk.tokens is None:
            raise WireError(f"{where}.chunks[{i}]", f"only encoded_text chunks are served, got {chunk.type!r}")
        tokens.extend(chunk.tokens)
    return tokens


_UNSERVED_SAMPLE_FIELDS = (
    ("topk_prompt_logprobs", lambda r: r.topk_prompt_logprobs > 0),
    ("topk_sample_logprobs", lambda r: r.topk_sample_logprobs > 0),
    ("target_prompt_logprobs", lambda r: r.target_prompt_logprobs is not None),
    ("prompt_alt_tokens_k", lambda r: r.prompt_alt_tokens_k > 0),
    ("prompt_logprobs_last_n", lambda r: r.prompt_logprobs_last_n is not None),
)


# Seeds fold into [0, 2**63 - 1) as Tinker's own server does, so any 64-bit seed reaches the engine.
_SEED_RANGE = 2**63 - 1


def _stops(stop: str | list[str] | list[int] | None) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if stop is None:
        return (), ()
    if isinstance(stop, str):
        return (stop,), ()
    if not stop:
        raise WireError("sampling_params.stop", "an empty list (no stop at all, not even EOS) is not served")
    if all(isinstance(s, str) for s in stop):
        return tuple(str(s) for s in stop), ()
    return (), tuple(int(s) for s in stop)


def sample_spec(req: SampleRequest) -> records.SampleSpec:
    """A sampling request's settings; what the server does not serve raises `WireError` naming it."""
    for name, is_set in _UNSERVED_SAMPLE_FIELDS:
        if is_set(req):
            raise WireError(name, f"is not served by this server (got {getattr(req, name)!r})")
    prompt_tokens(req.prompt)
    p = req.sampling_params
    if p.top_k != -1 and p.top_k < 1:
        raise WireError("sampling_params.top_k", f"expected -1 (no limit) or >= 1, got {p.top_k}")
    stop_strings, stop_token_ids = _stops(p.stop)
    return records.SampleSpec(
        max_tokens=p.max_tokens if p.max_tokens is not None else records.SampleSpec().max_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        seed=None if p.seed is None else p.seed % _SEED_RANGE,
        stop_strings=stop_strings,
        stop_token_ids=stop_token_ids,
        prompt_logprobs=bool(req.prompt_logprobs),
    )
