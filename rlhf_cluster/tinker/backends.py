"""What the Tinker service needs from the pools behind it, as two protocols.

`TrainBackend` is the learner ranks, every one of them holding the same bank of client adapters
(`bank.AdapterBank`); its calls run one at a time, in the order the service sends them.
`SampleBackend` is the generation engines, each holding the adapters the clients saved for
sampling. `actors/workers/tinker.py` implements both on Ray actors; tests implement them in process.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from rlhf_cluster.tinker.records import AdamParams, Datum, LoraSpec, SampleResult, SampleSpec


class TrainBackend(Protocol):
    def create(self, model_id: str, lora: LoraSpec) -> None: ...

    def free(self, model_id: str) -> None: ...

    def forward_backward(
        self, model_id: str, datums: list[Datum], loss_fn: str, config: Mapping[str, float | str], backward: bool
    ) -> tuple[list[np.ndarray], dict[str, float]]: ...

    def optim_step(self, model_id: str, adam: AdamParams) -> dict[str, float]: ...

    def save(self, model_id: str, folder: Path, optimizer: bool) -> None: ...

    def load(self, model_id: str, folder: Path, optimizer: bool) -> None: ...

    def export_adapter(self, model_id: str, folder: Path) -> str:
        """Write the client's adapter as a peft folder an engine loads; returns its digest."""
        ...


class SampleBackend(Protocol):
    def add_adapter(self, name: str, folder: Path, digest: str) -> None:
        """Every engine loads the peft folder under `name`, and proves it holds the tensors of
        `digest` (an error naming the engine otherwise)."""
        ...

    def remove_adapter(self, name: str) -> None: ...

    def sample(self, adapter: str | None, prompt: list[int], n: int, spec: SampleSpec) -> SampleResult:
        """`n` samples of `prompt` from the base model (`adapter` None) or an adapter added before."""
        ...
