"""The JSON bodies the Tinker server writes, as pydantic models whose field names and `type`
literals are those of the SDK's own types (tinker 0.38.0, `tinker/types/`): the service and the
routes build every answer from them and dump it with `model_dump()`, and each validates as the
SDK's type of the same name (tests/unit/test_tinker_wire.py checks it)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from rlhf_cluster.tinker.wire import OptimizerConfig


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class UntypedAPIFuture(_Response):
    """What every future-returning route answers at once; sampling futures carry one id per sample."""

    request_id: str
    model_id: str | None = None
    sample_sequence_ids: list[str] | None = None


class TryAgainResponse(_Response):
    type: Literal["try_again"] = "try_again"
    request_id: str
    queue_state: Literal["active", "paused_capacity", "paused_rate_limit"] = "active"


class RequestFailedResponse(_Response):
    """A failed operation, answered with 200: the SDK raises it as `RequestFailedError(category)`."""

    error: str
    category: Literal["unknown", "server", "user"]


class ClientConfigResponse(_Response):
    """The SDK's feature flags, set so it speaks only what this server serves: no JWT, plain httpx,
    uncompressed protobuf, forward_backward chunks one at a time, per-request future polling,
    client-side custom losses, no sampling-session joins."""

    pjwt_auth_enabled: bool = False
    use_pyqwest_transport: bool = False
    proto_compress_fwdbwd: bool = False
    parallel_fwdbwd_chunks: bool = False
    sample_use_retrieve_futures: bool = False
    custom_loss_server_side: bool = False
    sample_join_sampling_session: bool = False
    fwdbwd_max_chunk_len: int = 1024


class ClientDynamicConfigResponse(_Response):
    refresh_interval_sec: int = 300
    sample_cancel_enabled: bool = False


class SupportedModel(_Response):
    model_name: str
    max_context_length: int | None = None
    trainable: bool = True
    sampleable: bool = True


class GetServerCapabilitiesResponse(_Response):
    supported_models: list[SupportedModel]


class HealthResponse(_Response):
    status: Literal["ok"] = "ok"


class TelemetryResponse(_Response):
    status: Literal["accepted"] = "accepted"


class CreateSessionResponse(_Response):
    type: Literal["create_session"] = "create_session"
    session_id: str
    info_message: str | None = None
    warning_message: str | None = None
    error_message: str | None = None


class SessionHeartbeatResponse(_Response):
    type: Literal["session_heartbeat"] = "session_heartbeat"


class CreateSamplingSessionResponse(_Response):
    type: Literal["create_sampling_session"] = "create_sampling_session"
    sampling_session_id: str


class CreateModelResponse(_Response):
    model_id: str
    type: Literal["create_model"] = "create_model"


class ModelData(_Response):
    arch: str | None = None
    model_name: str | None = None
    tokenizer_id: str | None = None


class GetInfoResponse(_Response):
    """`model_data.tokenizer_id` is the base model's local folder, so `get_tokenizer()` loads it locally."""

    type: Literal["get_info"] = "get_info"
    model_data: ModelData
    model_id: str
    optimizer_config: OptimizerConfig = OptimizerConfig()
    is_lora: bool = True
    lora_rank: int | None = None
    model_name: str | None = None


class OptimStepResponse(_Response):
    metrics: dict[str, float] | None = None


class SaveWeightsResponse(_Response):
    path: str
    type: Literal["save_weights"] = "save_weights"


class LoadWeightsResponse(_Response):
    path: str | None = None
    model_id: str | None = None
    type: Literal["load_weights"] = "load_weights"


class SaveWeightsForSamplerResponseInternal(_Response):
    """A named save answers `path`; a save for `save_weights_and_get_sampling_client` answers `sampling_session_id`."""

    path: str | None = None
    sampling_session_id: str | None = None
    type: Literal["save_weights_for_sampler"] = "save_weights_for_sampler"


class GetSamplerResponse(_Response):
    sampler_id: str
    base_model: str
    model_path: str | None = None


class WeightsInfoResponse(_Response):
    base_model: str
    optimizer_config: OptimizerConfig = OptimizerConfig()
    is_lora: bool = True
    lora_rank: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None


class UnloadModelResponse(_Response):
    model_id: str
    type: Literal["unload_model"] = "unload_model"
