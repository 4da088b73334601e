"""A learner rank's checkpoint bookkeeping outside its backend: the host state (`rng/rank<r>.pt`:
its torch / numpy / python (and CUDA) RNG states, the LR scheduler's state, the step and the
backend, as tensors and one JSON string, so loading a checkpoint from elsewhere runs no code from
it), which backend wrote a checkpoint, and the digest that proves a restored state equal."""

from __future__ import annotations

import hashlib
import json
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

HOST_STATE_FORMAT = 2  # rng/rank<r>.pt: tensors + JSON (format 1 was a pickled dict)


def rng_state() -> dict:
    """This process's torch / numpy / python (and CUDA) RNG states."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def encode_host_state(rng: dict, scheduler: dict, step: int, backend: str, updates: int | None = None) -> dict:
    """A rank's host state (`rng_state()`, the LR scheduler's state, step, backend, and the
    optimizer steps applied, one per mini-batch and epoch a non-finite loss did not skip) as tensors and
    one JSON string: all that `torch.load(weights_only=True)` reads, so loading a checkpoint
    from elsewhere runs no code from it (numpy's and python's RNG tuples would need pickle)."""
    name, keys, pos, has_gauss, cached = rng["numpy"]
    version, internal, gauss_next = rng["python"]
    tensors = {"torch": rng["torch"], "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64))}
    if "cuda" in rng:
        tensors["cuda"] = rng["cuda"]
    meta = {
        "format": HOST_STATE_FORMAT,
        "numpy": [name, int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss_next],
        "scheduler": scheduler,
        "step": step,
        "backend": backend,
        "updates": step if updates is None else updates,
    }
    return {"tensors": tensors, "json": json.dumps(meta)}


def decode_host_state(saved: dict) -> dict:
    """`encode_host_state`'s inverse: {"rng", "scheduler", "step", "backend", "updates"} (a file
    written before `updates` was kept: as many as steps)."""
    meta, tensors = json.loads(saved["json"]), saved["tensors"]
    name, pos, has_gauss, cached = meta["numpy"]
    version, internal, gauss_next = meta["python"]
    rng = {
        "torch": tensors["torch"],
        "numpy": (name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached),
        "python": (version, tuple(internal), gauss_next),
    }
    if "cuda" in tensors:
        rng["cuda"] = tensors["cuda"]
    return {
        "rng": rng,
        "scheduler": meta["scheduler"],
        "step": meta["step"],
        "backend": meta["backend"],
        "updates": meta.get("updates", meta["step"]),
    }


def load_host_state(path: Path) -> dict:
    """A checkpoint's `rng/rank<r>.pt`, read with `weights_only=True` (no code in the file runs);
    a file in another format is a clear error naming it."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise RuntimeError(
            f"{path}: not a host-state file that can be read without unpickling (written before "
            f"format {HOST_STATE_FORMAT}, or not by rlhf_cluster); refusing to run code from it: {exc}"
        ) from None
    if (
        not isinstance(saved, dict)
        or not isinstance(saved.get("json"), str)
        or not isinstance(saved.get("tensors"), dict)
    ):
        raise RuntimeError(
            f"{path}: expected a host-state file of format {HOST_STATE_FORMAT} (tensors and a JSON string)"
        )
    return decode_host_state(saved)


def host_state_file(directory: Path, rank: int) -> Path:
    return directory / "rng" / f"rank{rank}.pt"


def save_host_state(directory: Path, rank: int, scheduler: dict, step: int, backend: str, updates: int) -> None:
    """RNG, scheduler state, step and updates applied of this rank (the part of the state outside the backend)."""
    torch.save(encode_host_state(rng_state(), scheduler, step, backend, updates), host_state_file(directory, rank))


def restore_host_state(directory: Path, rank: int, scheduler: Any) -> tuple[int, int]:
    """Load this rank's host state into `scheduler` and the RNGs; returns the step and the updates
    applied. More ranks than wrote the checkpoint: rank 0's schedule and step, this rank's own RNG."""
    path = host_state_file(directory, rank)
    extra = load_host_state(path if path.is_file() else host_state_file(directory, 0))
    scheduler.load_state_dict(extra["scheduler"])
    if path.is_file():
        set_rng_state(extra["rng"])
    return extra["step"], extra["updates"]


def check_written_by(directory: Path, marker: Path, rank: int, backend: str) -> None:
    """A clear error when a checkpoint was written by the other backend (its files differ) or its
    `backend` files are incomplete (`marker` missing)."""
    if marker.exists():
        return
    written = "unknown"
    host = host_state_file(directory, rank)
    if host.is_file():
        written = load_host_state(host).get("backend", "fsdp2")
    if written == backend:
        raise RuntimeError(f"checkpoint {directory}: incomplete, {marker} is missing (was its write finished?)")
    raise RuntimeError(
        f"checkpoint {directory}: no {backend} learner state at {marker} (written by backend "
        f"{written!r}); resume with the learner.backend it was written with"
    )


def state_digest(parts: dict[str, Any], scheduler: dict, step: int) -> str:
    """sha256 over a rank's state (`parts`: model and optimizer shards), scheduler and step."""
    digest = hashlib.sha256()
    for prefix, value in parts.items():
        feed_digest(digest, prefix, value)
    feed_digest(digest, "scheduler", scheduler)
    feed_digest(digest, "step", step)
    return digest.hexdigest()


def feed_digest(digest: hashlib._Hash, prefix: str, value: Any) -> None:
    """Hash a nested state (dicts, lists, tensors, plain values) in a stable order.

    Tensors are hashed by their bytes (a sharded tensor by its local shard), so two states hash
    equal only if they are bitwise equal.
    """
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            feed_digest(digest, f"{prefix}/{key}", value[key])
    elif isinstance(value, torch.Tensor):
        local = value.to_local() if hasattr(value, "to_local") else value
        digest.update(prefix.encode())
        digest.update(local.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        digest.update(f"{prefix}={value!r}".encode())
