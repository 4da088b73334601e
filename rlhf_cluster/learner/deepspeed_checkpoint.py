"""DeepSpeed's checkpoint files read without unpickling arbitrary objects.

DeepSpeed's own `TorchCheckpointEngine.load` unpickles in full (`weights_only` off), so resuming
from a checkpoint folder someone else wrote would run whatever code its pickles name. Every file
DeepSpeed reads back for our learner (ZeRO-3 model and optimizer states, every rank, fp32 or bf16)
goes through the engine's `checkpoint_engine`; this one loads with `weights_only=True`, allowing
only the two DeepSpeed classes those files hold besides tensors and plain containers. Imported only
by the DeepSpeed backend (it imports deepspeed).
"""

from __future__ import annotations

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum

# Found by loading every DeepSpeed checkpoint file the test suite writes with weights_only=True
# and adding what it refused: the ZeRO stage (an Enum) and the loss scaler's state (a plain object
# rebuilt from its attribute dict). Anything else in a file is refused with torch's error naming it.
ALLOWED_GLOBALS = [ZeroStageEnum, LossScaler]


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, saving as it does and loading with `weights_only=True`."""

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as exc:  # torch raises UnpicklingError (or RuntimeError) naming the global
                raise ValueError(
                    f"DeepSpeed checkpoint file {path} holds objects a checkpoint may not hold "
                    f"(only tensors, plain containers and {[c.__name__ for c in ALLOWED_GLOBALS]}): "
                    f"{exc}"
                ) from exc


def use_weights_only_loading(engine) -> None:
    """Make a `DeepSpeedEngine` read its checkpoints through `WeightsOnlyCheckpointEngine`."""
    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise ValueError(
            f"the DeepSpeed engine uses {type(engine.checkpoint_engine).__name__} for checkpoints; "
            "the learner expects DeepSpeed's torch checkpoint engine (no `checkpoint` engine in the config)"
        )
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)
