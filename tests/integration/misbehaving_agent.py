"""An agent that misbehaves, for the isolation tests (`generation.agent.isolation: process`): it
sleeps forever, allocates without bound, exits its process or raises. `direct` does what its first
message says; `once_each`, in a job, does each misbehaviour once and is otherwise the calculator
agent."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from tests.integration.calculator_agent import run as calculator


def misbehave(what: str):
    if what == "sleep":
        while True:
            time.sleep(3600)
    if what == "hog":
        held = []
        while True:
            held.append(bytearray(64 << 20))
    if what == "exit":
        os._exit(3)
    if what == "raise":
        raise RuntimeError("the agent's own bug")


def direct(base_url: str, api_key: str, messages: list[dict]) -> float:
    """Misbehaves as its first message's content says; else returns 1.0 without calling the model."""
    misbehave(messages[0]["content"])
    return 1.0


MARKERS = Path(tempfile.gettempdir()) / "rlhf-misbehaving-agent"  # the test empties it first


def once_each(base_url: str, api_key: str, messages: list[dict]) -> float | None:
    """In a job: the first episode of each group's sample 0 that finds a misbehaviour not yet
    claimed (a marker file made with O_EXCL, holding the episode's sample id) does it; every other
    episode is the calculator's."""
    episode = base_url.split("/episodes/")[1].removesuffix("/v1")  # <sample id>:<suffix>
    if episode.split(":")[-2] == "0":
        for what in ("sleep", "hog", "exit"):
            try:
                marker = os.open(MARKERS / what, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.write(marker, episode.rsplit(":", 1)[0].encode())
            os.close(marker)
            misbehave(what)
    return calculator(base_url, api_key, messages)


def always_raises(base_url: str, api_key: str, messages: list[dict]) -> float:
    """Broken: every call raises (the job must stop naming it, not drop every sample forever)."""
    raise RuntimeError("the agent is broken")
