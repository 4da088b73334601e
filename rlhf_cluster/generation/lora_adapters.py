"""An engine's LoRA adapter slot: with `learner.lora.sync: adapters` each version is the policy's
adapter matrices alone, served by vLLM as one LoRA adapter that every request carries and that
each version reloads in place.

vLLM loads an adapter from a peft folder (`adapter_config.json` + `adapter_model.safetensors`).
Each version's checked tensors are written to a folder of the engine's own, then loaded into the
adapter's one slot with `load_inplace`: requests in flight keep the slot, so from the next token
on they run with the new adapter, as with a full-weight reload. The adapter's id never changes
(requests carry `request`, which only names the slot), and the engine holds one adapter
(`max_loras: 1`), so vLLM never evicts it and never reads a folder again after its load.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from rlhf_cluster.config import LoraConfig
from rlhf_cluster.fileio import scratch_dir
from rlhf_cluster.models.lora import PEFT_PREFIX, adapter_config, adapter_names
from rlhf_cluster.models.quantization import check_push

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest

ADAPTER_NAME, ADAPTER_ID = "policy", 1
# vLLM's LoRA slots come in these ranks; an adapter of a smaller rank fits the next one up.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class AdapterSlot:
    """The adapter a generation engine serves: the expected tensors, the folder each version is
    written to, and the vLLM request every generation request carries."""

    def __init__(self, cfg: LoraConfig, base: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], engine: str):
        if cfg.rank > VLLM_LORA_RANKS[-1]:
            raise ValueError(f"learner.lora.rank: {cfg.rank} is above vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]}")
        self.cfg, self.engine = cfg, engine
        # The layout a push must have: A (r x in) and B (out x r) for every adapted base weight.
        self.spec: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for name in adapter_names(base, cfg):
            layer = name.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0]
            dtype, (out_features, in_features) = base[f"{layer}.weight"]
            a = name.endswith(".lora_A.weight")
            self.spec[name] = (dtype, (cfg.rank, in_features) if a else (out_features, cfg.rank))
        self.root = scratch_dir(f"{engine}-adapters")
        # Until the first version: requests run on the base model (adapters at B = 0).
        self.request: LoRARequest | None = None

    def engine_args(self) -> dict:
        """What vLLM's engine needs to serve the slot."""
        rank = next(r for r in VLLM_LORA_RANKS if r >= self.cfg.rank)
        return {"enable_lora": True, "max_lora_rank": rank, "max_loras": 1}

    def write(self, version: int, weights: list[tuple[str, torch.Tensor]]) -> LoRARequest:
        """Check a version's adapters against the slot's layout (`WeightSpecError`), write them as a
        peft folder, and return the in-place load request for it."""
        from vllm.lora.request import LoRARequest

        check_push(self.spec, weights, self.engine)
        folder = self.root / f"v{version:08d}"
        if folder.exists():  # a rollback publishes the same number again
            shutil.rmtree(folder)
        folder.mkdir()
        save_file({name: t.contiguous() for name, t in weights}, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(adapter_config(self.cfg)))
        return LoRARequest(ADAPTER_NAME, ADAPTER_ID, str(folder), load_inplace=True)

    def loaded(self, load: LoRARequest) -> None:
        """`load` (the request `write` returned) is in the slot: requests carry the slot from now
        on, and the folders of earlier versions go (vLLM read them once, at their load)."""
        from vllm.lora.request import LoRARequest

        self.request = LoRARequest(ADAPTER_NAME, ADAPTER_ID, load.lora_path)
        for folder in self.root.iterdir():
            if str(folder) != load.lora_path:
                shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
