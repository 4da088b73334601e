"""A learner rank's host state in a checkpoint (`rng/rank<r>.pt`): its torch / numpy / python (and
CUDA) RNG states, the LR scheduler's state, the step and the backend, as tensors and one JSON
string, so loading a checkpoint from elsewhere runs no code from it."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

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


def encode_host_state(rng: dict, scheduler: dict, step: int, backend: str) -> dict:
    """A rank's host state (`rng_state()`, the LR scheduler's state, step, backend) as tensors and
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
    }
    return {"tensors": tensors, "json": json.dumps(meta)}


def decode_host_state(saved: dict) -> dict:
    """`encode_host_state`'s inverse: {"rng": ..., "scheduler": ..., "step": ..., "backend": ...}."""
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
    return {"rng": rng, "scheduler": meta["scheduler"], "step": meta["step"], "backend": meta["backend"]}


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
