"""Sessions, training clients and samplers the service knows.

A session is the SDK's `ServiceClient`: it beats every few seconds, and one that has not beaten
for `timeout_s` ends; its training clients' adapters go with it (what was saved stays on disk), as
with Tinker's own service. A training client is a model id `"<session>:train:<n>"` (the SDK builds
that form itself when it loads a state), a sampler `"<session>:sample:<n>"`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from rlhf_cluster.tinker.records import LoraSpec


@dataclass
class Session:
    session_id: str
    tags: list[str]
    metadata: dict[str, str]
    last_beat: float = field(default_factory=time.monotonic)


@dataclass
class TrainingClient:
    model_id: str
    session_id: str
    lora: LoraSpec
    tokens_trained: int = 0


@dataclass
class Sampler:
    """What a sampler samples from: the base model (`adapter` None) or a saved sampler state,
    served by the engines under the sampler's own name. `owner` is the training client whose
    unnamed save made it (it goes when that client goes)."""

    sampler_id: str
    session_id: str
    adapter: str | None
    model_path: str | None
    owner: str | None = None


class Sessions:
    """The service's sessions, training clients and samplers, with their lifetimes."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.sessions: dict[str, Session] = {}
        self.clients: dict[str, TrainingClient] = {}
        self.samplers: dict[str, Sampler] = {}
        self.ended: set[str] = set()

    def create(self, tags: list[str], metadata: dict[str, str]) -> str:
        sid = uuid.uuid4().hex[:16]
        self.sessions[sid] = Session(sid, list(tags), dict(metadata))
        return sid

    def beat(self, session_id: str) -> bool:
        """False when the session ended or was never made (the SDK stops beating on 410)."""
        session = self.sessions.get(session_id)
        if session is None:
            return False
        session.last_beat = time.monotonic()
        return True

    def expired(self) -> list[str]:
        """End every session without a beat for `timeout_s`; returns their ids (the caller frees
        their clients' adapters and samplers)."""
        now = time.monotonic()
        gone = [sid for sid, s in self.sessions.items() if now - s.last_beat > self.timeout_s]
        for sid in gone:
            self.end(sid)
        return gone

    def end(self, session_id: str) -> bool:
        """End a session now (its client finished it); False when it was not live."""
        if self.sessions.pop(session_id, None) is None:
            return False
        self.ended.add(session_id)
        return True

    def clients_of(self, session_id: str) -> list[str]:
        return [mid for mid, c in self.clients.items() if c.session_id == session_id]

    def samplers_of(self, session_id: str | None = None, owner: str | None = None) -> list[str]:
        return [
            sid
            for sid, s in self.samplers.items()
            if (session_id is not None and s.session_id == session_id) or (owner is not None and s.owner == owner)
        ]

    @staticmethod
    def model_id(session_id: str, seq: int) -> str:
        return f"{session_id}:train:{seq}"

    @staticmethod
    def sampler_id(session_id: str, seq: int) -> str:
        return f"{session_id}:sample:{seq}"
