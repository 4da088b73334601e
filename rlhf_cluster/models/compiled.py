"""Regional `torch.compile`: each decoder layer's forward compiled on its own (`learner.compile`).

One layer's graph serves every layer of the model (same code, guards on shapes), so compilation
costs one layer's worth, paid by the first step; inductor fuses the layer's elementwise work
(norms, rotary, activation, casts) into few kernels, where eager runs each as its own launch. Only
`forward` is compiled: the hooks a sharding backend registers on the layer (FSDP2's all-gathers)
stay eager around it, as do the whole model's output layer and loss. Shapes are dynamic: every
micro-batch packs a different number of tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# On CUDA the compiled layers' gradients are not eager's: `tests/gpu` (one H200, 2026-11-27, fp32,
# SDPA) measured the first step's gradient norm 0.462 compiled vs 0.551 eager, with equal losses.
# Until that test passes on CUDA, `learner.compile` is refused there rather than train on them.
CUDA_GRADIENTS_MATCH_EAGER = False


def compile_layers(layers: Iterable[torch.nn.Module], device: torch.device) -> int:
    """Compile each layer's forward in place; returns how many. Refused on CUDA (above)."""
    if device.type == "cuda" and not CUDA_GRADIENTS_MATCH_EAGER:
        raise ValueError(
            "learner.compile: on CUDA the compiled decoder layers' gradients differ from eager ones "
            "(tests/gpu: grad norm 0.462 vs 0.551 on one H200); set learner.compile: false"
        )
    count = 0
    for layer in layers:
        layer.forward = torch.compile(layer.forward, dynamic=True)
        count += 1
    return count
