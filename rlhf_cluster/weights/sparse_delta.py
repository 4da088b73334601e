"""Element-sparse deltas between two versions of the engine's weights.

A learner step at RL learning rates changes few elements once the weights are in the engine's
dtype (measured here: ~3% of bf16 elements at lr 1e-6, `benchmarks/weight_changes.py`), so a
version can travel as the elements that changed: per tensor, the flat indices (int32) and the new
values, or the whole tensor when that is smaller (an index costs 4 bytes, so past about a third
of a bf16 tensor's elements changing, dense is cheaper). "Changed" compares bit patterns, not
values, so the receiver rebuilds exactly the sender's bytes (-0.0 vs 0.0, NaNs included).

The encoded parts are plain named tensors (`<name>::index`, `<name>::value`, or `<name>` whole),
so they pack into the same checksummed buckets as a full version. `fingerprint_tensors` is the
proof both sides compute over the full tensors: the sender over what it would have sent whole,
the engine over what it rebuilt.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import blake3
import torch

INDEX, VALUE = "::index", "::value"
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(_BITS[t.element_size()])


def encode(name: str, previous: torch.Tensor | None, current: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The parts that turn `previous` into `current`: nothing if no element changed, the changed
    elements' indices and values, or `current` whole (no previous of the same shape and dtype, or
    dense is no larger)."""
    if previous is None or previous.shape != current.shape or previous.dtype != current.dtype:
        return [(name, current)]
    changed = torch.nonzero(_bits(previous) != _bits(current)).reshape(-1)
    if changed.numel() == 0:
        return []  # unchanged: the receiver keeps its own
    if changed.numel() * (4 + current.element_size()) >= current.numel() * current.element_size():
        return [(name, current)]
    return [(name + INDEX, changed.to(torch.int32)), (name + VALUE, current.reshape(-1)[changed])]


def encode_version(
    previous: dict[str, torch.Tensor], named: Iterable[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """`encode` over a version's tensors, in their order."""
    for name, tensor in named:
        yield from encode(name, previous.get(name), tensor)


def apply(base: dict[str, torch.Tensor], parts: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The version the parts encode, on top of `base` (not modified; unchanged tensors are shared
    with it). Raises `KeyError` for a part of a tensor `base` lacks, `ValueError` for a part that
    does not fit it."""
    out = dict(base)
    pending: dict[str, torch.Tensor] = {}
    for name, tensor in parts:
        if name.endswith(INDEX):
            pending[name.removesuffix(INDEX)] = tensor
        elif name.endswith(VALUE):
            target = name.removesuffix(VALUE)
            index = pending.pop(target)
            old = base[target]
            if (
                tensor.dtype != old.dtype
                or index.numel() != tensor.numel()
                or (index.numel() and int(index.max()) >= old.numel())
            ):
                raise ValueError(
                    f"{target}: a delta of {index.numel()} {tensor.dtype} values does not fit "
                    f"{tuple(old.shape)} {old.dtype}"
                )
            new = old.clone()
            new.reshape(-1)[index.long()] = tensor
            out[target] = new
        else:
            out[name] = tensor
    if pending:
        raise ValueError(f"indices without values for {sorted(pending)[:3]}")
    return out


def fingerprint_tensors(version: int, created_at: str, named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """One digest of a version's full tensors: identity, then each tensor's name, dtype, shape and bytes, in order."""
    h = blake3.blake3(f"{version}|{created_at}".encode(), max_threads=blake3.blake3.AUTO)
    for name, tensor in named:
        t = tensor.detach().contiguous()
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        data = t.reshape(-1).view(torch.uint8).numpy()
        h.update(memoryview(data))  # type: ignore[arg-type]  # numpy stubs give ndarray __buffer__ only on Python 3.12+
    return h.hexdigest()
