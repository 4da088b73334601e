"""An OpenEnv environment as the agent (`generation.agent.environment: {type: openenv, url}`).

OpenEnv (the `openenv-core` package) serves an `Environment` (reset, step, state) as a FastAPI
app; an episode lives in one WebSocket session of it (`/ws`: each connection its own environment
instance; the plain HTTP `/reset` and `/step` make a fresh one per request, so they cannot hold an
episode). The messages, as the server speaks them:

    -> {"type": "reset", "data": {"seed": S, "episode_id": E}}
    <- {"type": "observation", "data": {"observation": {...}, "reward": R, "done": D}}
    -> {"type": "step", "data": {<the action's fields>}}
    <- the same, or {"type": "error", "data": {"message": M, "code": C}}
    -> {"type": "close"}

Per sample: reset (seeded from the prompt's text, so a group's samples meet one task; the episode
id is the gateway's, `<sample id>:<suffix>`, so the environment's state names the sample), then each
observation becomes the user's turn (its `observation_field`, or the whole observation as JSON),
the model's reply through the gateway becomes the action's `action_field`, until the environment
says done or `max_turns`. The episode's reward is the sum of its steps' rewards. This speaks the
protocol itself (`websockets`, already installed), so a generation worker never imports
openenv-core (which pulls in gradio at import).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from openai import OpenAI
from websockets.sync.client import connect

from rlhf_cluster.config import OpenEnvEnvironment


class EnvironmentProtocolError(RuntimeError):
    """The environment server refused a message or answered out of protocol (named, with its code)."""


def ws_url(url: str) -> str:
    """The server's episode socket: http(s)://host:port -> ws(s)://host:port/ws."""
    for http, ws in (("https://", "wss://"), ("http://", "ws://")):
        if url.startswith(http):
            url = ws + url[len(http) :]
    return url.rstrip("/") + "/ws"


def seed_of(messages: list[dict]) -> int:
    """A reset seed from the prompt's text: every sample of a group resets to the same task."""
    text = json.dumps([m.get("content") for m in messages], sort_keys=True)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little") & 0x7FFFFFFF


def episode_of(base_url: str) -> str:
    """The gateway episode a base URL serves (`.../episodes/<id>/v1`): `<sample id>:<suffix>`."""
    parts = base_url.rstrip("/").split("/")
    return parts[-2] if len(parts) >= 3 and parts[-3] == "episodes" else base_url


def observation_text(observation: dict[str, Any], field: str | None) -> str:
    """The user's turn for an observation: its `field` (an error naming the fields there are), or
    all of it as JSON."""
    if field is None:
        return json.dumps(observation, sort_keys=True)
    if field not in observation:
        raise EnvironmentProtocolError(
            f"generation.agent.environment.observation_field={field!r}: the observation has {sorted(observation)}"
        )
    value = observation[field]
    return value if isinstance(value, str) else json.dumps(value)


class OpenEnvAgent:
    """`agent(base_url, api_key, messages)` over an OpenEnv server: one episode per call."""

    def __init__(self, env: OpenEnvEnvironment, model_name: str):
        self.env, self.model_name = env, model_name

    def __call__(self, base_url: str, api_key: str, messages: list[dict]) -> float:
        env = self.env
        client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=env.timeout_s)
        total = 0.0
        with connect(ws_url(env.url), open_timeout=env.timeout_s, max_size=None) as socket:
            reset: dict[str, Any] = {"episode_id": episode_of(base_url)}  # the environment's state names our sample
            if env.seed_from_prompt:
                reset["seed"] = seed_of(messages)
            result = self._send(socket, {"type": "reset", "data": reset})
            for _ in range(env.max_turns):
                if result.get("done"):
                    break
                messages.append(
                    {"role": "user", "content": observation_text(result.get("observation", {}), env.observation_field)}
                )
                request: dict[str, Any] = {"model": self.model_name, "messages": messages}
                if env.max_tokens:
                    request["max_tokens"] = env.max_tokens
                reply = client.chat.completions.create(**request)
                text = reply.choices[0].message.content or ""
                messages.append({"role": "assistant", "content": text})
                result = self._send(socket, {"type": "step", "data": {env.action_field: text}})
                total += float(result.get("reward") or 0.0)
            socket.send(json.dumps({"type": "close"}))
        return total

    def _send(self, socket, message: dict) -> dict:
        socket.send(json.dumps(message))
        answer = json.loads(socket.recv(timeout=self.env.timeout_s))
        if answer.get("type") == "error":
            error = answer.get("data", {})
            raise EnvironmentProtocolError(
                f"the environment at {self.env.url} refused {message['type']}: {error.get('message')} "
                f"({error.get('code')})"
            )
        if answer.get("type") != "observation":
            raise EnvironmentProtocolError(
                f"the environment at {self.env.url} answered {message['type']} with {answer!r}"
            )
        return answer.get("data", {})
