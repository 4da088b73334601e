"""The gateway's HTTP API (FastAPI): OpenAI's `/v1/chat/completions`, `/v1/completions` and
`/v1/models` over one engine, with every tagged call recorded in its episode's trace.

A call names its episode in the path (`/episodes/<id>/v1/...`, so an agent only needs a
`base_url`), in an `X-Episode-Id` header, or in the request's `user` field; an untagged call is
answered and not recorded. Sampling follows the job's settings (`generation.sampling`), not the
request's: its `temperature`, `top_p`, and vLLM's extra `top_k`, `min_p` and `repetition_penalty`
are ignored, as are the other sampling fields (the engine never sees them). Every episode's samples
must come from the one policy the job trains and the learner corrects for, not from whatever each
agent asks. `max_tokens` and `stop` are honoured within the episode's token budget. Each response
carries an `rlhf` field with the episode id, the sampled token ids and their weight versions.

A vision-language policy takes `image_url` parts (`images`: data URLs, checked; refused with a 400
naming the part when unreadable, too large, from a refused URL or too many); the engine gets them
with the context and the trace keeps the context as the engine saw it, images expanded.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from rlhf_cluster.gateway.chat import ChatError
from rlhf_cluster.gateway.episode import EpisodeTrace, HistoryError
from rlhf_cluster.gateway.images import TEXT_ONLY, ImagePolicy, request_images
from rlhf_cluster.gateway.replies import ReplyParser, stop_strings, stream_chat, usage, without_stop
from rlhf_cluster.gateway.requests import RequestRefused, check_chat, check_model
from rlhf_cluster.generation.engine_outputs import Turn
from rlhf_cluster.generation.image_turns import ExpansionError, count_placeholders

# (context token ids, max tokens, stop strings, greedy[, images]) -> the engine's turn, or with
# images the turn and the context as the engine saw it (each image's placeholder expanded).
# Called with images only for a context that has some.
Generate = Callable[..., Awaitable["Turn | tuple[Turn, list[int]]"]]


class GatewayError(Exception):
    """A request refused with an HTTP status and an OpenAI-style error body."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code


@dataclass
class GatewayStats:
    """What the gateway served, for metrics."""

    requests: int = 0
    untagged: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # by HTTP status


class Gateway:
    """Episodes and the engine behind the API. `open_on_first_use`: a call with an unknown
    episode id starts that episode and the agent closes it (`/close`, handed to `on_close`): a
    standalone gateway. Otherwise only episodes opened with `open` are served, and whoever opened
    them closes them (a job's agent runner)."""

    def __init__(
        self,
        tokenizer,
        generate: Generate,
        model_name: str,
        budget: int,
        max_model_len: int,
        turn_max_tokens: int | None = None,
        open_on_first_use: bool = False,
        token: str | None = None,
        on_close: Callable[[EpisodeTrace], None] | None = None,
        replies: ReplyParser | None = None,
        samples: str = "auto",
        images: ImagePolicy = TEXT_ONLY,
    ):
        self.tokenizer, self.generate, self.model_name = tokenizer, generate, model_name
        # The model's turns as assistant messages (tool calls, reasoning): vLLM's parsers, hermes by default.
        self.replies = replies or ReplyParser(tokenizer)
        self._special_ids = set(tokenizer.all_special_ids)
        self.budget, self.max_model_len, self.turn_max_tokens = budget, max_model_len, turn_max_tokens
        self.open_on_first_use, self.token, self.on_close = open_on_first_use, token, on_close
        self.samples = samples  # generation.agent.samples: what a rewritten history makes of an episode
        self.images = images  # what image parts it takes (none for a text-only policy)
        self.episodes: dict[str, EpisodeTrace] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.stats = GatewayStats()

    def open(self, episode_id: str, greedy: bool = False) -> EpisodeTrace:
        trace = self.episodes[episode_id] = EpisodeTrace(
            episode_id, self.budget, greedy, samples=self.samples, image_token_id=self.images.image_token_id
        )
        self._locks[episode_id] = asyncio.Lock()
        return trace

    def close(self, episode_id: str) -> EpisodeTrace:
        """End an episode: later calls naming it are refused (410)."""
        trace = self.episodes.pop(episode_id)
        self._locks.pop(episode_id, None)
        trace.closed = True
        return trace

    def _episode(self, episode_id: str | None) -> tuple[EpisodeTrace, asyncio.Lock]:
        if episode_id is None:
            self.stats.untagged += 1
            trace = EpisodeTrace(
                "untagged", self.budget, samples=self.samples, image_token_id=self.images.image_token_id
            )
            return trace, asyncio.Lock()
        if episode_id not in self.episodes:
            if not self.open_on_first_use:
                raise GatewayError(404, f"episode {episode_id!r} is not open (closed, timed out, or never started)")
            self.open(episode_id)
        return self.episodes[episode_id], self._locks[episode_id]

    def reward(self, episode_id: str, value) -> None:
        if episode_id not in self.episodes:
            raise GatewayError(404, f"episode {episode_id!r} is not open")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise GatewayError(400, f"reward: expected a number, got {value!r}")
        self.episodes[episode_id].rewards.append(float(value))

    async def close_by_agent(self, episode_id: str) -> dict:
        if self.on_close is None:
            raise GatewayError(409, "episodes end when the job's agent function returns; there is nothing to close")
        if episode_id not in self.episodes:
            raise GatewayError(404, f"episode {episode_id!r} is not open")
        async with self._locks[episode_id]:  # after the call in flight, if any
            trace = self.close(episode_id)
        self.on_close(trace)
        return trace.record()

    async def _sample(
        self,
        episode_id: str | None,
        body: dict,
        context_of: Callable[[EpisodeTrace], list[int]],
        reply_to: Callable[[Turn], dict],
    ) -> tuple[list[int], Turn, dict]:
        """One call of an episode, under its lock: extend its context, sample a turn, record it with
        the message the agent is sent; returns the context, the turn and that message."""
        trace, lock = self._episode(episode_id)
        async with lock:
            if trace.closed:
                raise GatewayError(410, f"episode {episode_id!r} is closed")
            context = context_of(trace)
            turn, with_specials, seen = await self._turn(trace, context, body)
            reply = reply_to(turn)
            try:
                trace.saw(context, seen)
            except ExpansionError as exc:
                raise GatewayError(500, f"episode {episode_id!r}: {exc}", "server_error") from exc
            trace.add_turn(turn, reply, with_specials, seen)
        return seen, turn, reply

    async def _turn(self, trace: EpisodeTrace, context: list[int], body: dict) -> tuple[Turn, str, list[int]]:
        """Sample one model turn after `context`; returns it, its text with special tokens and the
        context as the engine saw it (images expanded)."""
        if len(context) >= self.max_model_len and not trace.turn_starts:
            raise GatewayError(
                400,
                f"the prompt is {len(context)} tokens; the engine's context holds "
                f"{self.max_model_len} (generation.max_model_len)",
            )
        limit = min(trace.remaining, self.max_model_len - len(context))
        if self.turn_max_tokens is not None:
            limit = min(limit, self.turn_max_tokens)
        asked = body.get("max_completion_tokens") or body.get("max_tokens")
        if asked is not None:
            if not isinstance(asked, int) or asked < 1:
                raise GatewayError(400, f"max_tokens: expected a positive integer, got {asked!r}")
            limit = min(limit, asked)
        if limit <= 0:  # the episode's token budget or the context is spent: the agent is told, nothing is sampled
            return Turn([], [], [], "length", ""), "", context
        turn, seen = await self._generate(trace, context, limit, body)
        text = without_stop(self.tokenizer.decode(turn.token_ids, skip_special_tokens=True), turn, body)
        with_specials = self.tokenizer.decode(turn.token_ids, skip_special_tokens=False)
        return Turn(turn.token_ids, turn.logprobs, turn.spans, turn.finish_reason, text), with_specials, seen

    async def _generate(
        self, trace: EpisodeTrace, context: list[int], limit: int, body: dict
    ) -> tuple[Turn, list[int]]:
        """The engine's turn after `context`, with the context's images where it has any."""
        images = trace.context_images
        placed = count_placeholders(context, self.images.image_token_id)
        if placed != len(images):  # vLLM would misplace them (or fail): the model wrote a placeholder itself
            raise GatewayError(
                400,
                f"the context holds {placed} image placeholders for {len(images)} images (a model turn that "
                "wrote the image token itself?): the engine cannot place them",
            )
        if not images:
            out = await self.generate(context, limit, stop_strings(body), trace.greedy)
        else:
            out = await self.generate(context, limit, stop_strings(body), trace.greedy, images)
        return out if isinstance(out, tuple) else (out, context)

    async def chat(self, episode_id: str | None, body: dict) -> dict:
        self.stats.requests += 1
        if (body.get("n") or 1) != 1:
            raise GatewayError(400, "n: the gateway samples one choice per call (an episode is one trajectory)")
        check_chat(body, self.model_name)
        messages, tools = [_plain(m) for m in body["messages"]], body.get("tools")
        # Images decoded (with image_urls: any, fetched) off the event loop, which serves every episode.
        read = partial(request_images, messages, self.images)
        images = await asyncio.to_thread(read) if self.images.max_images else read()

        def reply_to(turn: Turn) -> dict:
            if not tools and not self.replies.reads_reasoning:
                return {"role": "assistant", "content": turn.text}
            return self.replies.message(self._text_for_parsers(turn, body), tools)

        context, turn, reply = await self._sample(
            episode_id,
            body,
            lambda trace: trace.context_for(self.tokenizer, messages, tools, images),
            reply_to,
        )
        calls = reply.get("tool_calls")
        finish = "tool_calls" if calls else turn.finish_reason
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": reply,
                    "finish_reason": finish,
                    "logprobs": self._logprobs(turn) if body.get("logprobs") else None,
                }
            ],
            "usage": usage(context, turn),
            "rlhf": self._extension(episode_id, turn),
        }

    def _text_for_parsers(self, turn: Turn, body: dict) -> str:
        """The turn's text with special tokens kept (the parsers read markers that are special
        tokens), without the token or the stop string that ended it."""
        ids = turn.token_ids
        if turn.finish_reason == "stop" and ids and ids[-1] in self._special_ids:
            ids = ids[:-1]
        return without_stop(self.tokenizer.decode(ids, skip_special_tokens=False), turn, body)

    async def complete(self, episode_id: str | None, body: dict) -> dict:
        self.stats.requests += 1
        check_model(body, self.model_name)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise GatewayError(400, "prompt: expected one string")
        context, turn, _ = await self._sample(
            episode_id,
            body,
            lambda trace: trace.context_for_text(self.tokenizer, prompt),
            lambda turn: {"role": "assistant", "content": turn.text},
        )
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"index": 0, "text": turn.text, "finish_reason": turn.finish_reason, "logprobs": None}],
            "usage": usage(context, turn),
            "rlhf": self._extension(episode_id, turn),
        }

    def _logprobs(self, turn: Turn) -> dict:
        return {
            "content": [
                {"token": self.tokenizer.decode([t]), "logprob": lp, "bytes": None, "top_logprobs": []}
                for t, lp in zip(turn.token_ids, turn.logprobs)
            ]
        }

    @staticmethod
    def _extension(episode_id: str | None, turn: Turn) -> dict:
        return {
            "episode_id": episode_id,
            "token_ids": list(turn.token_ids),
            "weight_versions": [list(s) for s in turn.spans],
        }


async def _body_of(request: Request) -> dict:
    """A request's JSON object body; a 400 when it is not one."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GatewayError(400, f"the request body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise GatewayError(400, "the request body must be a JSON object")
    return body


def _episode_of(request: Request, body: dict, path_id: str | None) -> str | None:
    """The episode a request belongs to: from its path, its x-episode-id header or the body's `user`."""
    return path_id or request.headers.get("x-episode-id") or body.get("user") or None


def _add_error_handlers(app: FastAPI, gateway: Gateway) -> None:
    """Every refusal and failure as an OpenAI-style error body (counted by status in
    `gateway.stats.refused`): the agent hears the cause."""

    @app.exception_handler(GatewayError)
    async def refused(request: Request, exc: GatewayError):
        gateway.stats.refused[str(exc.status)] = gateway.stats.refused.get(str(exc.status), 0) + 1
        error = {"message": str(exc), "type": exc.kind, "param": exc.param, "code": exc.code or exc.status}
        return JSONResponse({"error": error}, status_code=exc.status)

    @app.exception_handler(RequestRefused)
    async def invalid(request: Request, exc: RequestRefused):  # what an OpenAI endpoint refuses
        return await refused(request, GatewayError(exc.status, str(exc), param=exc.param, code=exc.code))

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception):  # the agent hears the cause, not a bare 500
        return await refused(request, GatewayError(500, f"{type(exc).__name__}: {exc}", "server_error"))

    @app.exception_handler(ChatError)
    async def unrenderable(request: Request, exc: ChatError):
        return await refused(request, GatewayError(409 if isinstance(exc, HistoryError) else 400, str(exc)))


def build_app(gateway: Gateway) -> FastAPI:
    """The FastAPI app serving `gateway` (a bearer token is required when `gateway.token` is set)."""
    app = FastAPI(title="rlhf_cluster agent gateway")

    def authorized(request: Request) -> None:
        if gateway.token and request.headers.get("authorization") != f"Bearer {gateway.token}":
            raise GatewayError(
                401,
                "missing or wrong bearer token (Authorization: Bearer <the token>: generation.agent.token, or "
                "the standalone gateway's --token)",
                "authentication_error",
            )

    _add_error_handlers(app, gateway)

    async def chat(request: Request, episode: str | None = None):
        authorized(request)
        body = await _body_of(request)
        reply = await gateway.chat(_episode_of(request, body, episode), body)
        if not body.get("stream"):
            return reply
        options = body.get("stream_options")  # trial 23b G2: an agent counting tokens from the stream
        return stream_chat(reply, isinstance(options, dict) and bool(options.get("include_usage")))

    async def complete(request: Request, episode: str | None = None):
        authorized(request)
        body = await _body_of(request)
        return await gateway.complete(_episode_of(request, body, episode), body)

    async def models(request: Request, episode: str | None = None):
        authorized(request)
        return {
            "object": "list",
            "data": [{"id": gateway.model_name, "object": "model", "created": 0, "owned_by": "rlhf_cluster"}],
        }

    async def reward(request: Request, episode: str):
        authorized(request)
        gateway.reward(episode, (await _body_of(request)).get("reward"))
        return {"episode_id": episode, "rewards": gateway.episodes[episode].rewards}

    async def close(request: Request, episode: str):
        authorized(request)
        return await gateway.close_by_agent(episode)

    for prefix in ("/v1", "/episodes/{episode}/v1"):
        app.add_api_route(f"{prefix}/chat/completions", chat, methods=["POST"])
        app.add_api_route(f"{prefix}/completions", complete, methods=["POST"])
        app.add_api_route(f"{prefix}/models", models, methods=["GET"])
    app.add_api_route("/episodes/{episode}/v1/reward", reward, methods=["POST"])
    app.add_api_route("/v1/episodes/{episode}/reward", reward, methods=["POST"])
    app.add_api_route("/episodes/{episode}/v1/close", close, methods=["POST"])
    app.add_api_route("/v1/episodes/{episode}/close", close, methods=["POST"])
    return app


async def start_server(gateway: Gateway, host: str, port: int) -> tuple[object, asyncio.Task, int]:
    """Serve `gateway` with uvicorn on the running event loop; returns the server, its task and the
    port it listens on (`port` 0: a free one), once it accepts connections."""
    return await serve_app(build_app(gateway), host, port, "the gateway")


async def serve_app(app: FastAPI, host: str, port: int, what: str) -> tuple[object, asyncio.Task, int]:
    """Serve `app` with uvicorn on the running event loop (the gateway's, the Tinker server's);
    returns the server, its task and its port once it accepts connections."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        if serving.done():
            serving.result()  # it failed to start: raise why
            raise RuntimeError(f"{what} on {host}:{port} stopped before it started")
        await asyncio.sleep(0.01)
    return server, serving, sock.getsockname()[1]


def _plain(message) -> dict:
    return message if isinstance(message, dict) else {}
