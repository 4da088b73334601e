"""INT8 rollout weights: W8A8 in the compressed-tensors layout vLLM loads.

Every linear layer of the decoder blocks gets per-output-channel symmetric int8 weights with a
float32 ``weight_scale`` of shape ``[out, 1]`` (``w ~= weight * weight_scale``); activations are
quantized per token at run time by the engine. Embeddings, norms, biases and ``lm_head`` stay in
floating point: the output projection decides the sampled token and is the most sensitive layer.

The same function produces the engine's start checkpoint (a Hugging Face folder with a
``quantization_config``) and each published version's int8 variant, so the tensors a running
engine receives always have the names, dtypes and shapes it was built with.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rlhf_cluster.fileio import write_dir_atomic
from rlhf_cluster.models.int8_kernels import amx_int8_kernel_applies

log = logging.getLogger(__name__)

# The projections of Llama/Qwen2-style decoder blocks (vLLM fuses them into qkv_proj and
# gate_up_proj at load time and accepts the unfused names).
QUANTIZED_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
INT8_MAX = 127


class WeightSpecError(ValueError):
    """Tensors pushed into an engine do not match the names, dtypes or shapes it was built with."""


def is_quantized_weight(name: str, tensor: torch.Tensor) -> bool:
    """True for the 2-D weight of a decoder-block projection (the tensors W8A8 quantizes)."""
    parts = name.split(".")
    return tensor.ndim == 2 and len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in QUANTIZED_MODULES


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: returns ``(q [out, in] int8, scale [out, 1] float32)``."""
    w = weight.detach().to(torch.float32)
    # An all-zero row would give scale 0 and 0/0 below; any positive scale represents it exactly.
    # Divided by a tensor, not a Python number: CUDA divides by a host scalar as a product with its
    # reciprocal (one bit off the CPU's quotient), and a version quantised on a learner's GPU must be
    # byte-identical to one quantised on the host.
    divisor = torch.tensor(float(INT8_MAX), dtype=torch.float32, device=w.device)
    scale = (w.abs().amax(dim=1, keepdim=True) / divisor).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_state_dict(state_dict: Mapping[str, torch.Tensor], float_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The W8A8 variant of a full-precision state dict; unquantized tensors are cast to `float_dtype`."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if is_quantized_weight(name, tensor):
            q, scale = quantize_weight(tensor)
            out[name] = q
            out[name.removesuffix("weight") + "weight_scale"] = scale
        else:
            out[name] = tensor.detach().to("cpu", float_dtype).contiguous()
    return out


def dequantize_state_dict(quantized: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Back to float32 (``q * scale``): what the engine's weights represent, for error measurement."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in quantized.items():
        if name.endswith(".weight_scale"):
            continue
        scale = quantized.get(name + "_scale")
        out[name] = tensor.float() * scale if scale is not None else tensor.float()
    return out


def quantization_config() -> dict:
    """The ``quantization_config`` block of config.json for the W8A8 scheme above."""
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
                "input_activations": {
                    "num_bits": 8,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "token",
                    "dynamic": True,
                },
            }
        },
    }


def write_int8_model_dir(model_path: str | Path, quantized: Mapping[str, torch.Tensor], out_dir: str | Path) -> Path:
    """An engine start checkpoint: `model_path`'s config (plus `quantization_config`) and tokenizer
    with the int8 tensors, written as one folder (complete or absent). An existing one is kept."""
    src, target = Path(model_path), Path(out_dir)
    if (target / "config.json").is_file():
        return target

    def write(tmp: Path) -> None:
        for entry in src.iterdir():
            if (
                entry.is_file()
                and not entry.name.endswith((".safetensors", ".bin"))
                and entry.name != "model.safetensors.index.json"
            ):
                shutil.copy2(entry, tmp / entry.name)
        config = json.loads((src / "config.json").read_text())
        config["quantization_config"] = quantization_config()
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        save_file(dict(quantized), str(tmp / "model.safetensors"))

    return write_dir_atomic(target, write)


def int8_copy(model_path: str | Path, float_dtype: torch.dtype, out_dir: str | Path) -> Path:
    """A frozen model folder's int8 engine checkpoint (a judge's), written once (`write_int8_model_dir`)."""
    from safetensors.torch import load_file

    if (Path(out_dir) / "config.json").is_file():
        return Path(out_dir)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(model_path).expanduser().glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return write_int8_model_dir(Path(model_path).expanduser(), quantize_state_dict(tensors, float_dtype), out_dir)


def checkpoint_spec(model_path: str | Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Name -> (dtype, shape) of every tensor in a Hugging Face folder's safetensors files."""
    spec: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for file in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():
                sl = fh.get_slice(name)
                spec[name] = (_safetensors_dtype(sl.get_dtype()), tuple(sl.get_shape()))
    if not spec:
        raise FileNotFoundError(f"{model_path}: no .safetensors files to read the engine's tensor layout from")
    return spec


def check_push(
    spec: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    engine: str = "engine",
    optional: frozenset[str] = frozenset(),
    may_omit: frozenset[str] = frozenset(),
) -> None:
    """Refuse a push that does not fit the engine: a missing, unknown, mis-shaped or mistyped tensor.

    vLLM accepts float tensors into an int8 engine silently and then generates garbage, so this
    check runs before anything reaches the engine. A float tensor may go into a float slot of
    another width (the engine casts); integer slots need exactly their dtype. `optional` names
    tensors a push may carry that the engine's checkpoint lacks (a tied ``lm_head.weight``);
    `may_omit` the engine's tensors a push may leave out (a frozen vision tower, never sent).
    """
    seen: set[str] = set()
    problems: list[str] = []
    for name, tensor in tensors:
        seen.add(name)
        expected = spec.get(name)
        if expected is None:
            if name not in optional:
                problems.append(f"{name}: not a tensor of this engine")
            continue
        dtype, shape = expected
        fits = tensor.dtype.is_floating_point and dtype.is_floating_point or tensor.dtype == dtype
        if not fits or tuple(tensor.shape) != shape:
            problems.append(
                f"{name}: got {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}, "
                f"expected {str(dtype).removeprefix('torch.')} {list(shape)}"
            )
    missing = sorted(set(spec) - seen - may_omit)
    if missing:
        problems.append(f"{len(missing)} tensors missing, e.g. {', '.join(missing[:3])}")
    if problems:
        quantized = any(dtype == torch.int8 for dtype, _ in spec.values())
        hint = " (this engine runs int8 weights: push the store's int8 variant)" if quantized else ""
        raise WeightSpecError(f"{engine}: refused weight push{hint}: " + "; ".join(problems[:5]))


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _safetensors_dtype(code: str) -> torch.dtype:
    return _ST_DTYPES[code]


class Int8Linear(torch.nn.Module):
    """The same W8A8 scheme for frozen models outside vLLM (reference and reward models): int8
    weights per output channel, activations quantized per token at run time, rescaled to the
    input's dtype. The kernel is vLLM's AMX one where vLLM would pick it for this shape on this
    CPU (`int8_kernels.amx_int8_kernel_applies`: it takes bf16 activations, so the input is cast),
    else int8 x int8 -> int32 `torch._int_mm`."""

    # The buffers registered in __init__ (`weight_t` for torch._int_mm, `weight_packed` for AMX).
    weight_t: torch.Tensor | None
    weight_packed: torch.Tensor | None
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: torch.nn.Linear, kernel: Literal["amx", "int_mm"] | None = None):
        """`kernel` None: vLLM's AMX kernel where vLLM would pick it, else torch._int_mm (a
        benchmark names one to compare them)."""
        super().__init__()
        q, scale = quantize_weight(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        amx = linear.weight.device.type == "cpu" and amx_int8_kernel_applies(self.out_features, self.in_features)
        self.kernel = kernel or ("amx" if amx else "int_mm")
        if self.kernel == "amx":
            self.register_buffer("weight_packed", torch.ops._C.convert_weight_packed(q))
            self.register_buffer("weight_t", None)
            self.register_buffer("weight_scale", scale.reshape(-1).contiguous())  # [out]
        else:
            self.register_buffer("weight_packed", None)
            self.register_buffer("weight_t", q.t())  # [in, out] view of the [out, in] int8 weight
            self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out]
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.weight_packed is not None:
            flat = x.reshape(-1, shape[-1]).to(torch.bfloat16)
            bias = None if self.bias is None else self.bias.float()
            amx_mm = torch.ops._C.int8_scaled_mm_with_quant
            out = amx_mm(flat, self.weight_packed, self.weight_scale, bias, torch.bfloat16, True)
            return out.to(x.dtype).reshape(*shape[:-1], self.out_features)
        assert self.weight_t is not None  # the torch._int_mm kernel's weight
        flat = x.reshape(-1, shape[-1]).float()
        x_scale = (flat.abs().amax(dim=1, keepdim=True) / INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        x_q = torch.round(flat / x_scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        if x_q.is_cuda and x_q.shape[0] <= 16:
            # CUDA's int8 matmul needs more than 16 rows.
            x_q = torch.nn.functional.pad(x_q, (0, 0, 0, 17 - x_q.shape[0]))
        out = torch._int_mm(x_q, self.weight_t)[: flat.shape[0]].float() * x_scale * self.weight_scale
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype).reshape(*shape[:-1], self.out_features)


def quantize_linears(model: torch.nn.Module, kernel: Literal["amx", "int_mm"] | None = None) -> int:
    """Swap the decoder-block projections of a frozen model for `Int8Linear` (on `kernel`, None:
    each layer's own choice) in place; returns how many.

    Embeddings, the LM head and a reward model's scalar head stay in floating point, as in the
    rollout engines.
    """
    swapped: list[Int8Linear] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and name in QUANTIZED_MODULES:
                swapped.append(Int8Linear(child, kernel))
                setattr(parent, name, swapped[-1])
    on_cpu_int_mm = any(m.kernel == "int_mm" and m.weight_scale.device.type == "cpu" for m in swapped)
    if on_cpu_int_mm and (warning := slow_cpu_int8_warning()) is not None:
        log.warning(warning)
    return len(swapped)


def slow_cpu_int8_warning() -> str | None:
    """Why `Int8Linear`'s `torch._int_mm` kernel will be slower than float on this CPU, or None
    (layers on vLLM's AMX kernel never warn: it runs at bf16's speed, `benchmarks/README.md`).
    torch's CPU int8 matmul is fast only with AVX-512 kernels: on an AVX2-only CPU
    `benchmarks/int8_scoring.py` measured it 25-28x slower than fp32 (2026-11-26); on an AMX
    Xeon (AVX-512 kernels) 2.0-2.1x faster than fp32 but slower than bf16."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return None
    return (
        f"scoring.quantization: int8 on a CPU whose torch kernels are {capability} (no AVX-512): its int8 "
        "matmul measured ~25x slower than fp32 on AVX2 (benchmarks/README.md, int8_scoring); "
        "`scoring.quantization: none` scores faster on this machine"
    )
