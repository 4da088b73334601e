"""The HTTP app the Tinker SDK talks to: its routes under `/api/v1`, the `X-API-Key` check, and
answers in the shapes and status codes the SDK reads.

A call the SDK makes that this server does not serve gets 404 naming it (the SDK raises a
`NotFoundError` at once and does not retry). A finished future is JSON, or protobuf for the two
results the SDK reads only as protobuf (forward_backward's and sample's); a failed one is 200 with
`{"error", "category"}`, which the SDK raises as `RequestFailedError`. Never 501: the SDK retries
every 5xx ten times.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rlhf_cluster.gateway.server import serve_app
from rlhf_cluster.tinker import proto, replies, wire
from rlhf_cluster.tinker.futures import Outcome, TryAgain
from rlhf_cluster.tinker.service import ServiceError, TinkerService

log = logging.getLogger(__name__)
PROTOBUF = "application/x-protobuf"
API = "/api/v1"


def build_app(service: TinkerService, api_key: str) -> FastAPI:
    app = FastAPI(title="rlhf_cluster Tinker server")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        route = request.url.path.removeprefix(API)
        if request.url.path not in (f"{API}/healthz", "/metrics") and request.headers.get("x-api-key") != api_key:
            response: Response = _error(401, "missing or wrong X-API-Key (the server's tinker token)")
        else:
            try:
                response = await call_next(request)
            except ServiceError as exc:
                response = _error(exc.status, exc.detail)
            except proto.WireError as exc:
                response = _error(400, str(exc), getattr(exc, "field", None))
            except Exception as exc:  # a bug answered as one; the server keeps serving
                log.exception("%s failed", route)
                response = _error(500, f"{route} failed on the server: {type(exc).__name__}: {exc}")
        service.stats.request(route if request.url.path.startswith(API) else request.url.path, response.status_code)
        return response

    _add_session_routes(app, service)
    _add_training_routes(app, service)
    _add_sampling_routes(app, service)
    _add_state_routes(app, service)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.api_route(API + "/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def not_served(rest: str):
        return _error(404, f"/api/v1/{rest} is not served by this server (rlhf-cluster tinker)")

    return app


def _error(status: int, detail: str, field: str | None = None) -> JSONResponse:
    body: dict = {"detail": detail}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=status)


async def _parse(request: Request, cls):
    return wire.parse_body(cls, await request.body())


def _future(request_id: str, model_id: str | None = None, sample_ids: list[str] | None = None) -> dict:
    return replies.UntypedAPIFuture(
        request_id=request_id, model_id=model_id, sample_sequence_ids=sample_ids
    ).model_dump()


def _add_session_routes(app: FastAPI, service: TinkerService) -> None:
    @app.get(API + "/healthz")
    async def healthz():
        return replies.HealthResponse().model_dump()

    @app.post(API + "/client/config")
    async def client_config():
        return replies.ClientConfigResponse().model_dump()

    @app.post(API + "/client/dynamic_config")
    async def dynamic_config():
        return replies.ClientDynamicConfigResponse().model_dump()

    @app.get(API + "/get_server_capabilities")
    async def capabilities():
        model = replies.SupportedModel(
            model_name=service.cfg.model.name, max_context_length=service.cfg.model.max_context_length
        )
        return replies.GetServerCapabilitiesResponse(supported_models=[model]).model_dump()

    @app.post(API + "/create_session")
    async def create_session(request: Request):
        req = await _parse(request, wire.CreateSessionRequest)
        metadata = {str(k): str(v) for k, v in (req.user_metadata or {}).items()}
        return replies.CreateSessionResponse(session_id=service.create_session(req.tags, metadata)).model_dump()

    @app.post(API + "/session_heartbeat")
    async def heartbeat(request: Request):
        service.heartbeat((await _parse(request, wire.SessionHeartbeatRequest)).session_id)
        return replies.SessionHeartbeatResponse().model_dump()

    @app.post(API + "/sessions/{session_id}/finish")
    async def finish(session_id: str):
        await service.finish_session(session_id)
        return {}

    @app.post(API + "/telemetry")
    async def telemetry():
        return replies.TelemetryResponse().model_dump()

    @app.post(API + "/retrieve_future")
    async def retrieve(request: Request):
        req = await _parse(request, wire.FutureRetrieveRequest)
        outcome = await service.retrieve(req.request_id)
        if outcome is None:  # the SDK sends its call again
            return _error(410, f"request {req.request_id} is not known to this server (expired, or a restart)")
        if isinstance(outcome, TryAgain):
            return replies.TryAgainResponse(request_id=req.request_id).model_dump()
        return _finished(outcome)

    @app.post(API + "/cancel_future")
    async def cancel(request: Request):
        service.futures.cancel((await _parse(request, wire.CancelFutureRequest)).request_id)
        return {}


def _finished(outcome: Outcome) -> Response | dict:
    if outcome.failed:
        return replies.RequestFailedResponse(error=outcome.error or "", category=outcome.category.value).model_dump()
    if isinstance(outcome.body, bytes):
        return Response(outcome.body, media_type=PROTOBUF)
    return outcome.body or {}


def _add_training_routes(app: FastAPI, service: TinkerService) -> None:
    @app.post(API + "/create_model")
    async def create_model(request: Request):
        req = await _parse(request, wire.CreateModelRequest)
        rid = service.create_model(req.session_id, req.model_seq_id, req.base_model, wire.lora_spec(req))
        return _future(rid, model_id=service.sessions.model_id(req.session_id, req.model_seq_id))

    @app.post(API + "/get_info")
    async def get_info(request: Request):
        return service.get_info((await _parse(request, wire.GetInfoRequest)).model_id)

    @app.post(API + "/forward_backward")
    async def forward_backward(request: Request):
        if request.headers.get("content-encoding"):
            raise ServiceError(400, "Content-Encoding: compressed bodies are not served (client/config says so)")
        call = proto.decode_forward_backward(await request.body())
        return _future(service.forward_backward(call), model_id=call.model_id)

    @app.post(API + "/optim_step")
    async def optim_step(request: Request):
        req = await _parse(request, wire.OptimStepRequest)
        return _future(service.optim_step(req.model_id, req.seq_id or 0, wire.adam_params(req)), model_id=req.model_id)

    @app.post(API + "/unload_model")
    async def unload(request: Request):
        req = await _parse(request, wire.UnloadModelRequest)
        return _future(service.unload(req.model_id), model_id=req.model_id)


def _add_sampling_routes(app: FastAPI, service: TinkerService) -> None:
    @app.post(API + "/create_sampling_session")
    async def create_sampler(request: Request):
        req = await _parse(request, wire.CreateSamplingSessionRequest)
        sid = await asyncio.to_thread(
            service.create_sampler, req.session_id, req.sampling_session_seq_id, req.base_model, req.model_path
        )
        return replies.CreateSamplingSessionResponse(sampling_session_id=sid).model_dump()

    @app.get(API + "/samplers/{sampler_id}")
    async def sampler(sampler_id: str):
        return service.sampler(sampler_id)

    @app.post(API + "/asample")
    async def asample(request: Request):
        req = await _parse(request, wire.SampleRequest)
        spec = wire.sample_spec(req)
        rid, ids = service.sample(
            req.sampling_session_id,
            req.base_model,
            req.model_path,
            req.seq_id,
            wire.prompt_tokens(req.prompt),
            req.num_samples,
            spec,
        )
        return _future(rid, sample_ids=ids)


def _add_state_routes(app: FastAPI, service: TinkerService) -> None:
    @app.post(API + "/save_weights")
    async def save_weights(request: Request):
        req = await _parse(request, wire.SaveWeightsRequest)
        return _future(service.save_weights(req.model_id, req.seq_id or 0, req.path), model_id=req.model_id)

    @app.post(API + "/load_weights")
    async def load_weights(request: Request):
        req = await _parse(request, wire.LoadWeightsRequest)
        if req.model_id is not None:
            model_id = req.model_id
        elif req.session_id is not None and req.model_seq_id is not None:
            model_id = service.sessions.model_id(req.session_id, req.model_seq_id)
        else:
            raise ServiceError(400, "model_id, or session_id and model_seq_id: one is required")
        return _future(service.load_weights(model_id, req.seq_id or 0, req.path, req.optimizer), model_id=model_id)

    @app.post(API + "/save_weights_for_sampler")
    async def save_for_sampler(request: Request):
        req = await _parse(request, wire.SaveWeightsForSamplerRequest)
        rid = service.save_for_sampler(req.model_id, req.seq_id or 0, req.path, req.sampling_session_seq_id)
        return _future(rid, model_id=req.model_id)

    @app.post(API + "/weights_info")
    async def weights_info(request: Request):
        return service.weights_info((await _parse(request, wire.WeightsInfoRequest)).tinker_path)

    @app.delete(API + "/training_runs/{model_id}/checkpoints/{checkpoint_id:path}")
    async def delete_checkpoint(model_id: str, checkpoint_id: str):
        await asyncio.to_thread(service.delete_checkpoint, model_id, checkpoint_id)
        return {}


async def start_server(app: FastAPI, host: str, port: int) -> tuple[object, asyncio.Task, int]:
    """Serve the Tinker app on the running event loop; returns the server, its task and its port."""
    return await serve_app(app, host, port, "the Tinker server")
