"""How weights move from the learner to the engines (`weights`): the transport, one class per
kind picked by `type` (filesystem, direct, collective), the store's retention."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, TypeAlias

from pydantic import Field

from rlhf_cluster.config.base import _Strict, _Typed, typed_union


class FilesystemTransport(_Typed):
    """Every version is written to the weight store's directory; generation workers load it from there."""

    type: Literal["filesystem"] = Field("filesystem", description="Weight transport kind.")


class DirectTransport(_Typed):
    """Each version goes from the learner's rank 0 straight into every generation engine, without
    disk: layer-aligned buckets of engine-dtype bytes (int8 quantised once on the sender) in Ray's
    shared-memory object store, each checked by its checksum before the engine loads any of them.
    The store on disk then keeps only every `weights.persist_every`-th version (recovery, late joiners)."""

    type: Literal["direct"] = Field("direct", description="Weight transport kind.")
    bucket_mb: float = Field(64.0, gt=0, description="Bucket size in MiB (a bucket never splits a decoder layer).")
    delta: Literal["none", "sparse"] = Field(
        "none",
        description="`sparse`: full-precision engines get only the elements that changed since the previous "
        "version (indices + values; a tensor whole where that is smaller), rebuilt on the engine and proven by the "
        "fingerprint of the full weights. Int8 engines still get every version whole.",
    )
    full_every: int = Field(
        10,
        ge=1,
        description="With `delta: sparse`, every K-th version (and every one also "
        "written to the store) goes whole; an engine that missed a delta rebuilds from the "
        "newest whole version and the deltas since.",
    )
    senders: Literal["rank0", "every_rank"] = Field(
        "rank0",
        description="`every_rank`: each FSDP2 learner rank casts, checksums and puts its share of a version "
        "(decoder layers dealt by bytes; engines assemble and prove the whole); `rank0`: rank 0 sends everything. "
        "Versions also written to the store, sparse deltas and LoRA go from rank 0. Not the default: on a 2-core CPU "
        "machine one sender already uses every core (two FSDP2 ranks: 1.06-1.07x rank 0's push time, "
        "benchmarks/weight_sync.py --learner-ranks 2); it is for nodes where each rank has its own device-to-host "
        "link.",
    )


class CollectiveTransport(_Typed):
    """Each version is broadcast from the learner's rank 0 to every generation engine over a
    process group of its own (rank 0 and the engines; rebuilt when an engine joins, leaves or is
    replaced): NCCL between GPUs, gloo on CPU. The same layer-aligned, checksummed buckets as
    `direct`, one broadcast per bucket, with the sender taking part in every push. The store on
    disk keeps every `weights.persist_every`-th version, as with `direct`."""

    type: Literal["collective"] = Field("collective", description="Weight transport kind.")
    bucket_mb: float = Field(64.0, gt=0, description="Bucket size in MiB (one broadcast each; never splits a layer).")
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto",
        description="The group's backend: `auto` is nccl where the learner has CUDA, else gloo. Every engine "
        "of an nccl group needs a GPU of its own.",
    )
    timeout_s: float = Field(
        60.0, gt=0, description="Bound on building the group and on each broadcast (a member that died or hung)."
    )


if TYPE_CHECKING:  # the union alone: mypy cannot read the Annotated union typed_union builds at run time
    WeightTransport: TypeAlias = FilesystemTransport | DirectTransport | CollectiveTransport
else:
    WeightTransport = typed_union(FilesystemTransport, DirectTransport, CollectiveTransport)


class WeightsConfig(_Strict):
    """The weight store and how versions reach generation."""

    transport: WeightTransport = Field(
        default_factory=DirectTransport,
        description="How versions move to generation, by `type`: direct (the "
        "default: learner to engines without disk, through Ray's object store), collective (a broadcast group of "
        "the learner's rank 0 and the engines: nccl or gloo) or filesystem (every version through the store directory; "
        "`transport: filesystem` is short for `transport: {type: filesystem}`).",
    )
    dir: str | None = Field(None, description="Store directory (default: RUN_DIR/weights).")
    keep: int = Field(3, ge=1, description="Newest versions kept on disk.")
    persist_every: int = Field(
        10,
        ge=1,
        description="With `transport: direct` or `collective`, write every K-th version (and every "
        "checkpoint's) to the store on disk, off the step's critical path; the filesystem transport writes "
        "every version.",
    )
