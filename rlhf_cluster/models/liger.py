"""Liger's Triton kernels for a learner's model on CUDA (the optional `gpu` extra: `liger-kernel`).

RMSNorm and the gated MLP (SwiGLU) are swapped on the model instance, so nothing else in the
process changes: Liger's own call also replaces the classes in the model type's module for every
model of that type loaded after it (a CPU model loaded later reached a Triton kernel, tests/gpu on
one H200, 2026-11-28), so `apply_liger` puts those module attributes back (`instance_only`).
Liger's RoPE and cross-entropy kernels are left out: the output layer runs our own chunked
log-probs (`chunked_logprobs`). Anchor: a plain loop with Liger's RMSNorm, RoPE and SwiGLU reached 16.2%
MFU at Qwen2.5-0.5B on one H100 against 14.0% without (2026-11-24, ../shared/GPU.md).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


def liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True


def liger_kernels(model: torch.nn.Module) -> dict[str, bool]:
    """Which of Liger's kernels the learner's `model` takes. A mixture of experts keeps
    transformers' own experts (grouped_mm): Liger's `swiglu` swaps them for its fused MoE, which
    took 29.5 s of a 31.7 s step of the gpu-check MoE (1.6B, 0.59B active) on one H200, where the
    plain model's forward and backward took 0.22 s (2026-11-28, torch.profiler)."""
    from rlhf_cluster.models.moe import is_moe

    config = getattr(model, "config", None)
    return {
        "rms_norm": True,
        "swiglu": not (config is not None and is_moe(config)),
        "rope": False,
        "cross_entropy": False,
        "fused_linear_cross_entropy": False,
    }


def apply_liger(model: torch.nn.Module, device: torch.device, enabled: bool | None) -> list[str]:
    """Swap `model`'s RMSNorms and MLPs for Liger's kernels where `enabled` (None: on CUDA where
    liger-kernel is installed); returns the kernels applied ([] where none were). `enabled: True`
    without CUDA or without the package is refused."""
    if enabled is False or (enabled is None and (device.type != "cuda" or not liger_available())):
        return []
    if device.type != "cuda":
        raise ValueError("learner.liger_kernels: true needs CUDA (Liger's kernels are Triton GPU kernels)")
    if not liger_available():
        raise ValueError("learner.liger_kernels: true, but liger-kernel is not installed (pip install '.[gpu]')")
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    kernels = liger_kernels(model)
    instance_only(model, lambda: _apply_liger_kernel_to_instance(model=model, **kernels))
    applied = [name for name, on in kernels.items() if on]
    log.info("Liger kernels on the learner's model: %s", ", ".join(applied))
    return applied


def instance_only(model: torch.nn.Module, patch: Callable[[], None]) -> list[str]:
    """Run `patch` (which changes `model`'s modules in place) and put back every attribute it
    replaced in the Python modules that define `model`'s classes, so models loaded after it are
    as they would have been; returns the names put back."""
    modules = {sys.modules[type(m).__module__] for m in model.modules() if type(m).__module__ in sys.modules}
    before = {module: dict(vars(module)) for module in modules}
    try:
        patch()
    finally:
        restored = []
        for module, attributes in before.items():
            for name, value in attributes.items():
                if vars(module).get(name) is not value:
                    setattr(module, name, value)
                    restored.append(f"{module.__name__}.{name}")
    return restored
