"""Tinker checkpoint paths, `tinker://<model_id>/<weights|sampler_weights>/<name>`, and the folder
each one's files live in under the server's state directory.

`weights` are `save_state` checkpoints (adapter and optimizer state, loadable into a training
client), `sampler_weights` are adapters exported for sampling. The form is the SDK's
(`ParsedCheckpointTinkerPath.from_tinker_path` wants exactly three parts after the scheme), so a
name never holds a `/`. Model ids are this server's `"{session_id}:train:{n}"`; their `:` become
`+` in folder names, and `+` is not allowed in a model id, so two ids never share a folder."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

SCHEME = "tinker://"
KINDS = ("weights", "sampler_weights")
_MODEL_ID = re.compile(r"[A-Za-z0-9._:-]+")
_FORM = "tinker://<model_id>/<weights|sampler_weights>/<name>"


@dataclass(frozen=True)
class TinkerPath:
    model_id: str
    kind: Literal["weights", "sampler_weights"]
    name: str

    def __post_init__(self) -> None:
        if not _MODEL_ID.fullmatch(self.model_id):
            raise ValueError(f"model id {self.model_id!r}: expected letters, digits and . _ : - only")
        if self.kind not in KINDS:
            raise ValueError(f"checkpoint kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.name in ("", ".", "..") or any(c in self.name for c in "/\\\0"):
            raise ValueError(f"checkpoint name {self.name!r}: expected a non-empty name without '/' or '\\'")

    @classmethod
    def parse(cls, path: str) -> TinkerPath:
        if not isinstance(path, str) or not path.startswith(SCHEME):
            raise ValueError(f"{path!r} is not a Tinker path: expected {_FORM}")
        parts = path[len(SCHEME) :].split("/")
        if len(parts) != 3 or parts[1] not in KINDS:
            raise ValueError(f"{path!r} is not a Tinker path: expected {_FORM}")
        try:
            return cls(model_id=parts[0], kind=parts[1], name=parts[2])  # type: ignore[arg-type]
        except ValueError as e:
            raise ValueError(f"{path!r}: {e} (expected {_FORM})") from None

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.model_id}/{self.kind}/{self.name}"


def model_folder_name(model_id: str) -> str:
    """A model id as a folder name (`:` -> `+`)."""
    if not _MODEL_ID.fullmatch(model_id):
        raise ValueError(f"model id {model_id!r}: expected letters, digits and . _ : - only")
    return model_id.replace(":", "+")


def state_folder(state_dir: str | Path, path: TinkerPath) -> Path:
    """Where a checkpoint's files live: `<state_dir>/<model id, ':' as '+'>/<kind>/<name>`."""
    return Path(state_dir) / model_folder_name(path.model_id) / path.kind / path.name
