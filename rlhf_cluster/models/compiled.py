"""Regional `torch.compile`: each decoder layer's forward compiled on its own (`learner.compile`).

One layer's graph serves every layer of the model (same code, guards on shapes), so compilation
costs one layer's worth, paid by the first step; inductor fuses the layer's elementwise work
(norms, rotary, activation, casts) into few kernels, where eager runs each as its own launch. Only
`forward` is compiled: the hooks a sharding backend registers on the layer (FSDP2's all-gathers)
stay eager around it, as do the whole model's output layer and loss. Shapes are dynamic: every
micro-batch packs a different number of tokens.

On CUDA the compiled layers' gradients were not eager's (`tests/gpu`, one H200, 2026-11-27, fp32,
SDPA: the first step's gradient norm 0.462 compiled vs 0.551 eager, with equal losses). The
candidate causes, each with its own fix (`CompileFix`), are bisected by
`benchmarks/gpu/compile_parity.py`. On one H200 (2026-11-28, torch 2.11, liger-kernel 0.8.5) every
variant with Liger's RMSNorm failed in dynamo (it cannot trace `LigerRMSNormFunction`) and the one
without Liger matched eager (largest relative L2 distance of a parameter's gradient 1.2e-6): the
learner leaves Liger out of a compiled model (config `_compile_without_liger`), and compiled layers
run on CUDA under `CUDA_FIX`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class CompileFix:
    """What compiled layers run under so their gradients are eager's: environment variables set in
    the rank's process before anything compiles, and whether each layer's tensor inputs are cloned
    (so no two of a compiled graph's inputs share storage)."""

    env: dict[str, str] = field(default_factory=dict)
    clone_inputs: bool = False


# The inductor setting each environment variable stands for. Inductor reads its environment once,
# when its config module is first imported (in a learner rank that may be before the layers are
# compiled), so the setting is made too; set globally, not in a `config.patch` block, since the
# backward is compiled lazily, at the first backward, outside any block around the forward.
_INDUCTOR_SETTINGS = {"TORCHINDUCTOR_MIX_ORDER_REDUCTION": ("triton", "mix_order_reduction")}

# The fix the CUDA path runs under: Inductor's mix-order reduction off (it fuses the RMSNorm
# backward's row and column reductions into one kernel; pytorch#193061, #190796, fixed in #193103).
# Kept as a guard for that known bug of torch 2.10-2.13: the H200's passing variant (Liger off) ran
# without it, so it may not be needed there; tests/gpu's parity test runs under it.
CUDA_FIX = CompileFix(env={"TORCHINDUCTOR_MIX_ORDER_REDUCTION": "0"})
# The cause, as the refusal names it (the bisect's verdict on one H200, 2026-11-28).
CUDA_CAUSE = (
    "Liger's RMSNorm under compile (dynamo cannot trace it; torch 2.11, one H200): the learner leaves Liger out of "
    "a compiled model"
)
# The switch: True since `compile_parity` passed on CUDA without Liger (one H200, 2026-11-28); False
# refuses learner.compile on CUDA, naming `CUDA_CAUSE`.
CUDA_GRADIENTS_MATCH_EAGER = True

# A parity check's variant (`compiled_as`): its fix and backend, on any device, never refused.
_variant: tuple[CompileFix, str] | None = None


@contextmanager
def compiled_as(fix: CompileFix, backend: str = "inductor") -> Iterator[None]:
    """Within it, `compile_layers` compiles under `fix` with `backend` on every device, refusal
    lifted: how `compile_parity` and tests/gpu run a variant through the learner's own code."""
    global _variant
    before, _variant = _variant, (fix, backend)
    try:
        yield
    finally:
        _variant = before


def compile_layers(layers: Iterable[torch.nn.Module], device: torch.device) -> int:
    """Compile each layer's forward in place; returns how many. On CUDA under `CUDA_FIX`, and
    refused until `CUDA_GRADIENTS_MATCH_EAGER` (above); on the CPU as it is."""
    if _variant is not None:
        fix, backend = _variant
    elif device.type == "cuda":
        if not CUDA_GRADIENTS_MATCH_EAGER:
            raise ValueError(
                "learner.compile: on CUDA the compiled decoder layers' gradients differ from eager ones "
                f"(tests/gpu: grad norm 0.462 vs 0.551 on one H200; {CUDA_CAUSE}); set learner.compile: false"
            )
        fix, backend = CUDA_FIX, "inductor"
    else:
        fix, backend = CompileFix(), "inductor"
    apply_fix(fix)
    count = 0
    for layer in layers:
        forward = torch.compile(layer.forward, dynamic=True, backend=backend)
        layer.forward = with_cloned_inputs(forward) if fix.clone_inputs else forward
        count += 1
    return count


def apply_fix(fix: CompileFix) -> None:
    """`fix`'s environment in this process, and the inductor settings it stands for."""
    os.environ.update(fix.env)
    if not fix.env:
        return
    from torch._inductor import config

    for name, value in fix.env.items():
        section, setting = _INDUCTOR_SETTINGS.get(name, ("", ""))
        if hasattr(getattr(config, section, None), setting):  # a torch without the setting: its variable alone
            setattr(getattr(config, section), setting, value not in ("0", "false", "False", ""))


def with_cloned_inputs(forward: Callable[..., Any]) -> Callable[..., Any]:
    """`forward` called with a copy of each tensor argument (tuples of tensors too, such as the rotary
    embedding's cos and sin): the compiled graph's inputs then never share storage with each other."""

    def cloned(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.clone()
        if isinstance(value, tuple):
            return tuple(cloned(v) for v in value)
        return value

    @functools.wraps(forward)
    def call(*args: Any, **kwargs: Any) -> Any:
        return forward(*(cloned(a) for a in args), **{k: cloned(v) for k, v in kwargs.items()})

    return call
