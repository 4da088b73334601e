"""Direct weight delivery, the Ray-free half: a version's tensors in the engine's dtype, packed
into layer-aligned buckets of flat bytes, each with a checksum, and a fingerprint over them.

The sender (the learner's rank 0) casts every tensor to what the engine holds (bf16/fp16/fp32,
or W8A8 int8 quantised once here), packs consecutive tensors into buckets of about `bucket_bytes`
that never split a decoder layer (vLLM fuses q/k/v and gate/up of one layer at load time, so a
layer's tensors must arrive together), and checksums each bucket with BLAKE3. The receiver checks
every bucket against its checksum before anything reaches the engine, then unpacks the buckets as
zero-copy views in the order they were packed. Both sides compute the version's fingerprint from
the bucket checksums of the bytes they hold, so an engine proves what it loaded.
"""

from __future__ import annotations

import datetime as dt
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import blake3
import numpy as np
import torch

from rlhf_cluster.fileio import checksum
from rlhf_cluster.models.modeling import decoder_layer
from rlhf_cluster.models.quantization import is_quantized_weight, quantize_weight

ALIGN = 64  # every tensor starts on a 64-byte boundary inside its bucket, so any dtype view is legal


class DeliveryError(RuntimeError):
    """A delivered bucket or version does not match what the sender declared."""


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lies in its bucket's bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class BucketSpec:
    """One bucket: its tensors, its size and the BLAKE3 digest of its bytes."""

    tensors: tuple[TensorSlot, ...]
    nbytes: int
    digest: str


@dataclass
class DeliveryManifest:
    """What the sender declares for one version of one engine variant (`full` or `int8`)."""

    version: int
    created_at: str
    variant: str
    buckets: list[BucketSpec] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.version, self.created_at, [b.digest for b in self.buckets])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DeliveryManifest:
        buckets = [
            BucketSpec(
                tuple(TensorSlot(**{**t, "shape": tuple(t["shape"])}) for t in b["tensors"]), b["nbytes"], b["digest"]
            )
            for b in data["buckets"]
        ]
        return cls(data["version"], data["created_at"], data["variant"], buckets)


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def fingerprint(version: int, created_at: str, digests: Iterable[str]) -> str:
    """One digest for a delivered version: its identity and every bucket's checksum, in order."""
    h = blake3.blake3(f"{version}|{created_at}".encode())
    for d in digests:
        h.update(b"|" + d.encode())
    return h.hexdigest()


def engine_tensors(
    named: Iterable[tuple[str, torch.Tensor]], variant: str, float_dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors an engine of `variant` holds: floats cast to `float_dtype`; for `int8` the
    decoder projections quantised per output channel, each followed by its `weight_scale`. On the
    tensors' own device (a learner's GPU: only the engine's bytes cross to the host)."""
    for name, tensor in named:
        if variant == "int8" and is_quantized_weight(name, tensor):
            q, scale = quantize_weight(tensor)
            yield name, q
            yield name.removesuffix("weight") + "weight_scale", scale
        elif tensor.is_floating_point():
            yield name, tensor.detach().to(dtype=float_dtype)  # on its device: the packer copies it to the host
        else:
            yield name, tensor.detach()


def layer_of(name: str) -> str:
    """The unit a bucket never splits: a decoder layer (`model.layers.3`) or a top-level module."""
    return decoder_layer(name) or name.rsplit(".", 1)[0]


class Staging:
    """The host memory buckets are packed in. With `reuse`, one buffer, grown when a bucket needs
    more, refilled for every bucket: for a `put` that copies the bytes away (the object store's),
    so packing a version touches no fresh pages (zeroing and faulting in a new 64 MiB buffer per
    bucket cost ~2/3 of packing on a CPU). Without it, a new buffer per bucket (for a `put` that
    keeps the bytes). Where tensors come from a CUDA device the buffer is pinned and every copy
    into it asynchronous, one wait per bucket: the device-to-host hop at the wire's speed."""

    def __init__(self, reuse: bool = False):
        self.reuse = reuse
        self._buffer: torch.Tensor | None = None

    @property
    def pinned(self) -> bool:
        """Whether the buffer held for reuse is pinned memory."""
        return self._buffer is not None and self._buffer.is_pinned()

    def buffer(self, nbytes: int, pinned: bool) -> torch.Tensor:
        held = self._buffer
        if held is not None and held.numel() >= nbytes and held.is_pinned() == pinned:
            return held[:nbytes]
        buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        if self.reuse:
            self._buffer = buffer
        return buffer


class BucketFiller:
    """Collects tensors (in order) into buckets of at least `bucket_bytes` unless the tensors run
    out, closing a bucket only between two layers. Fed one tensor at a time, it holds at most one
    bucket (plus one layer) of them; each closed bucket's bytes lie in `staging`'s memory."""

    def __init__(self, bucket_bytes: int, staging: Staging | None = None):
        self.bucket_bytes = bucket_bytes
        self.staging = staging or Staging()
        self.pending: list[tuple[str, torch.Tensor]] = []
        self.size = 0
        self.layer: str | None = None  # the layer of the last tensor taken

    def add(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[BucketSpec, np.ndarray]]:
        """Take one tensor; yields the bucket it closes, if any."""
        this_layer = layer_of(name)
        if self.pending and self.size >= self.bucket_bytes and this_layer != self.layer:
            yield _pack(self.pending, self.staging)
            self.pending, self.size = [], 0
        self.pending.append((name, tensor))
        self.size += _aligned(tensor.numel() * tensor.element_size())
        self.layer = this_layer

    def finish(self) -> Iterator[tuple[BucketSpec, np.ndarray]]:
        """The last bucket."""
        if self.pending:
            yield _pack(self.pending, self.staging)
            self.pending, self.size = [], 0


def pack_buckets(
    named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[tuple[BucketSpec, np.ndarray]]:
    """Pack `named` (in order, consumed lazily) into layer-aligned buckets; yields each bucket's
    spec and its bytes (each bucket in memory of its own: the caller may keep them)."""
    filler = BucketFiller(bucket_bytes)
    for name, tensor in named:
        yield from filler.add(name, tensor)
    yield from filler.finish()


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _pack(tensors: list[tuple[str, torch.Tensor]], staging: Staging) -> tuple[BucketSpec, np.ndarray]:
    slots, offset = [], 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        slots.append(TensorSlot(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset, nbytes))
        offset += _aligned(nbytes)
    cuda = any(t.is_cuda for _, t in tensors)
    buffer = staging.buffer(offset, pinned=cuda)
    end = 0
    for slot, (_, t) in zip(slots, tensors):
        buffer[end : slot.offset].zero_()  # the alignment gap before it: the checksum covers every byte
        flat = t.contiguous().reshape(-1).view(torch.uint8)
        buffer[slot.offset : slot.offset + slot.nbytes].copy_(flat, non_blocking=cuda)
        end = slot.offset + slot.nbytes
    buffer[end:].zero_()
    if cuda:
        torch.cuda.synchronize()  # the copies into pinned memory are asynchronous: one wait per bucket
    payload = buffer.numpy()
    return BucketSpec(tuple(slots), offset, checksum(payload)), payload


def check_bucket(spec: BucketSpec, payload, index: int) -> str:
    """Refuse a bucket whose bytes are not the sender's; returns its digest."""
    nbytes = memoryview(payload).nbytes
    if nbytes != spec.nbytes:
        raise DeliveryError(f"bucket {index}: {nbytes} bytes arrived, {spec.nbytes} were sent")
    digest = checksum(payload)
    if digest != spec.digest:
        raise DeliveryError(f"bucket {index}: checksum {digest[:12]} does not match the sender's {spec.digest[:12]}")
    return digest


def unpack_bucket(spec: BucketSpec, payload) -> list[tuple[str, torch.Tensor]]:
    """The bucket's tensors as views of `payload` (no copy; the engine copies them in place)."""
    with warnings.catch_warnings():  # payloads from the object store are read-only; nothing writes to them
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(memoryview(payload).cast("B"), dtype=torch.uint8)
    out = []
    for slot in spec.tensors:
        view = raw[slot.offset : slot.offset + slot.nbytes].view(getattr(torch, slot.dtype)).reshape(slot.shape)
        out.append((slot.name, view))
    return out


class VersionPacker:
    """Packs one version for engines of one variant (`full` or `int8`) as its tensors arrive, so
    a sender that gathers the model a layer at a time never holds it whole: each tensor is turned
    into what the engine holds, each closed bucket is handed to `put` (the sender's transport,
    e.g. the object store) at once, its bytes in `staging`'s memory (reused only where `put`
    copies them away). `seconds` is the time spent here."""

    def __init__(
        self,
        version: int,
        created_at: str,
        variant: str,
        float_dtype: torch.dtype,
        bucket_bytes: int,
        put: Callable[[np.ndarray], object],
        staging: Staging | None = None,
    ):
        self.manifest = DeliveryManifest(version, created_at, variant)
        self.handles: list = []
        self.seconds = 0.0
        self._variant, self._dtype, self._put = variant, float_dtype, put
        self._filler = BucketFiller(bucket_bytes, staging)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        begun = time.perf_counter()
        for engine_name, engine_tensor in engine_tensors([(name, tensor)], self._variant, self._dtype):
            self._emit(self._filler.add(engine_name, engine_tensor))
        self.seconds += time.perf_counter() - begun

    def pack(self, named: Iterable[tuple[str, torch.Tensor]]) -> tuple[DeliveryManifest, list]:
        """`add` every tensor of `named`, then `finish`: one whole version at once."""
        for name, tensor in named:
            self.add(name, tensor)
        return self.finish()

    def finish(self) -> tuple[DeliveryManifest, list]:
        """Close the last bucket; returns the manifest and what `put` returned, bucket by bucket."""
        begun = time.perf_counter()
        self._emit(self._filler.finish())
        self.seconds += time.perf_counter() - begun
        return self.manifest, self.handles

    def _emit(self, buckets: Iterator[tuple[BucketSpec, np.ndarray]]) -> None:
        for spec, payload in buckets:
            self.manifest.buckets.append(spec)
            self.handles.append(self._put(payload))


def verified_tensors(
    manifest: DeliveryManifest, payloads: list, corrupt: Callable[[int, object], object] | None = None
) -> tuple[list[tuple[str, torch.Tensor]], str]:
    """Check every bucket against the manifest, then return all tensors (views, in packing order)
    and the fingerprint of the bytes checked. Raises `DeliveryError` before anything is unpacked.
    `corrupt` is a test hook that may replace a bucket's bytes as they arrive."""
    if len(payloads) != len(manifest.buckets):
        raise DeliveryError(
            f"version {manifest.version}: {len(payloads)} buckets arrived, {len(manifest.buckets)} were sent"
        )
    if corrupt is not None:
        payloads = [corrupt(i, p) for i, p in enumerate(payloads)]
    digests = [check_bucket(spec, payload, i) for i, (spec, payload) in enumerate(zip(manifest.buckets, payloads))]
    tensors = [t for spec, payload in zip(manifest.buckets, payloads) for t in unpack_bucket(spec, payload)]
    return tensors, fingerprint(manifest.version, manifest.created_at, digests)


def persisted(
    version: int, persist_every: int, checkpoint_every: int, total_steps: int, refresh_every: int = 0
) -> bool:
    """Whether the direct transport also writes `version` to the store on disk: every
    `persist_every`-th, every checkpoint's (version = step + 1), the last, and every version the
    KL reference is refreshed from (`refresh_every`: `algorithm.kl.reference_refresh.every_steps`, 0: none)."""
    refreshed = refresh_every > 0 and version % refresh_every == 0
    return version % persist_every == 0 or version % checkpoint_every == 0 or version == total_steps or refreshed
