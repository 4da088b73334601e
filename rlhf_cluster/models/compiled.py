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


def compile_layers(layers: Iterable[torch.nn.Module]) -> int:
    """Compile each layer's forward in place; returns how many."""
    count = 0
    for layer in layers:
        layer.forward = torch.compile(layer.forward, dynamic=True)
        count += 1
    return count
