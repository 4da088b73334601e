"""Liger's Triton kernels for a learner's model on CUDA (the optional `gpu` extra: `liger-kernel`).

RMSNorm and the gated MLP (SwiGLU) are swapped on the model instance, so nothing else in the
process changes; Liger's RoPE and cross-entropy kernels are left out: its RoPE patch replaces a
function of the model type's module for every model of that type in the process (a CPU model
beside it would reach a Triton kernel), and the output layer runs our own chunked log-probs
(`chunked_logprobs`). Anchor: a plain loop with Liger's RMSNorm, RoPE and SwiGLU reached 16.2%
MFU at Qwen2.5-0.5B on one H100 against 14.0% without (2026-11-24, ../shared/GPU.md).
"""

from __future__ import annotations

import logging

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
    _apply_liger_kernel_to_instance(model=model, **kernels)
    applied = [name for name, on in kernels.items() if on]
    log.info("Liger kernels on the learner's model: %s", ", ".join(applied))
    return applied
