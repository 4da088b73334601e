"""`rlhf-cluster gateway`: the gateway on its own, over one in-process engine, no training. An
agent harness runs against it as against any OpenAI endpoint; each episode it names (path,
`X-Episode-Id` header or `user` field) starts on first use, and when the harness closes it
(`POST /v1/episodes/<id>/close`, after an optional `/reward`) its exact token trace is appended to
a JSONL file: a way to try an agent on the gateway, or to collect token-faithful traces."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

from rlhf_cluster.config import JobConfig
from rlhf_cluster.gateway.episode import EpisodeTrace
from rlhf_cluster.gateway.replies import ReplyParser
from rlhf_cluster.gateway.runner import engine_turns, image_policy
from rlhf_cluster.gateway.server import Gateway, start_server
from rlhf_cluster.generation.engine import VLLMEngine
from rlhf_cluster.generation.multimodal import EngineImages


class EpisodeFile:
    """Closed episodes, one JSON line each, flushed and fsynced per line (a kill loses none)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, trace: EpisodeTrace) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(trace.record()) + "\n")
            f.flush()
            os.fsync(f.fileno())


def engine_images(cfg: JobConfig, model_path: str) -> EngineImages | None:
    """The engine's image settings (the `data` section's) where the model is a vision-language
    one (its config.json has a `vision_config`); None for a text-only model."""
    config = json.loads((Path(model_path).expanduser() / "config.json").read_text())
    vision = "vision_config" in config or any(isinstance(v, dict) and "vision_config" in v for v in config.values())
    data = cfg.data
    return EngineImages(data.max_images_per_prompt, data.min_pixels, data.max_pixels) if vision else None


def serve(
    cfg: JobConfig, model_path: str, host: str, port: int, token: str | None, out: Path, on_ready: Callable[[str], None]
) -> None:
    """Serve until interrupted (SIGINT/SIGTERM); `on_ready` gets the URL once it listens."""
    assert cfg.generation.seed is not None  # JobConfig resolves every component seed when it validates
    engine = VLLMEngine(
        model_path,
        cfg.generation,
        dtype=cfg.engine_dtype,
        seed=cfg.generation.seed,
        name="gateway",
        images=engine_images(cfg, model_path),
    )
    episodes = EpisodeFile(out)
    agent = cfg.generation.agent

    gateway = Gateway(
        engine.tokenizer,
        engine_turns(engine),
        model_name=agent.model_name if agent else "policy",
        budget=cfg.generation.sampling.max_new_tokens,
        max_model_len=cfg.generation.max_model_len,
        turn_max_tokens=cfg.generation.turn_max_tokens,
        open_on_first_use=True,
        token=token,
        on_close=episodes.write,
        replies=ReplyParser(engine.tokenizer, agent.tool_parser, agent.reasoning_parser) if agent else None,
        samples=agent.samples if agent else "auto",
        images=image_policy(engine, agent),
    )

    async def run() -> None:
        server, serving, bound = await start_server(gateway, host, port)
        # A wildcard bind is no address a client can use: this machine's name (reachable on every interface).
        on_ready(f"http://{socket.gethostname() if host in ('0.0.0.0', '::', '') else host}:{bound}")
        await serving

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    # uvicorn stops on SIGINT/SIGTERM, then raises the signal again once it has: a requested stop.
    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.close()
