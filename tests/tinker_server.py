"""A Tinker server in a thread of the test process: the real app and service on any backends, on a
free port, with its own event loop; `url` is what the SDK's `base_url` takes."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from rlhf_cluster.config.tinker import TinkerConfig
from rlhf_cluster.tinker.server import build_app, start_server
from rlhf_cluster.tinker.service import TinkerService

KEY = "tml-test-key"


@contextmanager
def served(cfg: TinkerConfig, train, sample, tokenizer_dir: str) -> Iterator[tuple[str, TinkerService]]:
    """Serve a `TinkerService` on `train` and `sample` until the block ends."""
    loop = asyncio.new_event_loop()
    started: dict = {}
    ready = threading.Event()

    async def main():
        service = TinkerService(cfg, train, sample, tokenizer_dir)
        server, serving, port = await start_server(build_app(service, KEY), "127.0.0.1", 0)
        started.update(service=service, server=server, serving=serving, port=port)
        ready.set()
        await serving

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    assert ready.wait(30), "the Tinker server did not start within 30 s"
    try:
        yield f"http://127.0.0.1:{started['port']}", started["service"]
    finally:
        started["server"].should_exit = True
        thread.join(30)
        started["service"].close()
