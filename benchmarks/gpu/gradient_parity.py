"""Two runs' gradients compared parameter by parameter: max abs difference, relative L2 error and
cosine, worst first, and the worst per kind of parameter (its name without the layer index), so
"only the RMSNorm weights differ" reads at a glance. `compile_parity` (learner.compile against eager)
and tests/gpu's parity test read it.

Tolerance, per parameter, relative L2 error: fp32 1e-3. Reassociated fp32 sums (a fused kernel adds
in another order) move a reduction of n terms by about n x 6e-8 at worst (1e-4 for the 10^3-10^4 terms
a layer sums), typically far less (1.3e-6 measured: the CPU's compiled layers against eager); the
CUDA bug this looks for moved the global gradient norm by 16%, per-parameter errors of order 1e-1:
1e-3 is two orders of magnitude from either. bf16: compared with eager fp32, a gradient may be up
to `BF16_FACTOR` times as far from it as eager bf16's (eager rounds between ops where a fused kernel
keeps fp32, so two bf16 runs differ by about bf16's own error), and never less than the fp32 tolerance.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

FP32_TOLERANCE = 1e-3
BF16_FACTOR = 2.0


@dataclass(frozen=True)
class ParamDiff:
    """One parameter's gradient, compiled against the reference."""

    name: str
    max_abs: float
    rel_l2: float  # |got - ref| / |ref| (L2 over the whole tensor)
    cosine: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.rel_l2 <= self.tolerance


def _rel_l2(ref: torch.Tensor, got: torch.Tensor) -> float:
    diff, norm = float((got - ref).norm()), float(ref.norm())
    return diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))


def compare_gradients(
    reference: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], tolerance: float | Mapping[str, float]
) -> list[ParamDiff]:
    """Every reference parameter's gradient against `got`'s (a missing one fails), worst first (by
    relative error over its tolerance)."""
    diffs = []
    for name, ref in reference.items():
        tol = tolerance if isinstance(tolerance, float) else tolerance[name]
        if name not in got or got[name].shape != ref.shape:
            diffs.append(ParamDiff(name, float("inf"), float("inf"), 0.0, tol))
            continue
        r, g = ref.double().flatten(), got[name].double().flatten()
        norms = float(r.norm() * g.norm())
        cosine = float(r @ g) / norms if norms > 0 else float(r.norm() == g.norm())
        diffs.append(ParamDiff(name, float((g - r).abs().max()), _rel_l2(r, g), cosine, tol))
    return sorted(diffs, key=lambda d: d.rel_l2 / d.tolerance, reverse=True)


def bf16_tolerances(fp32: Mapping[str, torch.Tensor], eager_bf16: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Per parameter: `BF16_FACTOR` x eager bf16's own relative error against fp32, at least the fp32 tolerance."""
    return {
        n: max(FP32_TOLERANCE, BF16_FACTOR * _rel_l2(ref.double(), eager_bf16[n].double())) for n, ref in fp32.items()
    }


def kind_of(name: str) -> str:
    """A parameter's kind: its name with the layer index dropped (`model.layers.*.input_layernorm.weight`)."""
    return re.sub(r"\.\d+\.", ".*.", name)


def summarize(diffs: list[ParamDiff], loss_eager: float, loss_compiled: float, worst: int = 8) -> dict:
    """A variant's figures: pass or fail, the loss difference, the worst parameters and, per kind,
    the worst relative error (and the kinds that fail)."""
    kinds: dict[str, float] = {}
    failing: set[str] = set()
    for d in diffs:
        kinds[kind_of(d.name)] = max(kinds.get(kind_of(d.name), 0.0), d.rel_l2)
        if not d.passed:
            failing.add(kind_of(d.name))
    loss_tol = max(d.tolerance for d in diffs) if diffs else FP32_TOLERANCE
    loss_diff = abs(loss_compiled - loss_eager)
    return {
        "passed": bool(diffs) and all(d.passed for d in diffs) and loss_diff <= loss_tol * max(1.0, abs(loss_eager)),
        "loss_eager": loss_eager,
        "loss_compiled": loss_compiled,
        "loss_diff": loss_diff,
        "parameters": len(diffs),
        "failing_parameters": sum(not d.passed for d in diffs),
        "failing_kinds": sorted(failing),
        "max_rel_l2": max((d.rel_l2 for d in diffs), default=None),
        "worst": [dataclasses.asdict(d) for d in diffs[:worst]],
        "worst_by_kind": dict(sorted(kinds.items(), key=lambda kv: kv[1], reverse=True)),
    }
