"""The weight transports' interface, and the two whose engines fetch on their own: the store
directory (`filesystem`) and Ray's object store (`direct`). `registry` picks one by
`weights.transport.type`; `collective` holds the broadcast group's.

Every transport has the same two ends and the same unit, the *delivery* of one version:

    learner rank 0:  publish(version, tensors, files, snapshot) -> Future[Publication]
                     (the publication's `delivery` is what the driver pushes to every engine)
    engine:          fetch(delivery, variant) -> Fetched (tensors to load, fingerprint to report)

A delivery is a typed record (`messages.Delivery`): the version's identity, its files (the
probe), the transport and, per engine variant (`full`, `int8`), what that variant's engines fetch
and the `fingerprint` an engine must report back to prove what it loaded. Each transport computes
the fingerprint from the bytes it moves (bucket checksums in flight, shard checksums on disk), and
a fetch refuses (`WeightRefused`) bytes that do not match what the sender declared.
`stored_delivery` makes the store's newest version a `filesystem` delivery, so an engine has one
load path whichever way a version reached it.

The object store is the one Ray-specific part: the actors hand `put` and `get` in, so this
package never imports ray.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from rlhf_cluster.config import CollectiveTransport, DirectTransport, WeightsConfig
from rlhf_cluster.fileio import done_future
from rlhf_cluster.weights import sparse_delta
from rlhf_cluster.weights.buckets import (
    DeliveryError,
    DeliveryManifest,
    Staging,
    VersionPacker,
    fingerprint,
    verified_tensors,
)
from rlhf_cluster.weights.experts import checkpoint_tensors
from rlhf_cluster.weights.messages import Delivery, Publication, VariantLink
from rlhf_cluster.weights.store import WeightIntegrityError, WeightStore

Named = Iterable[tuple[str, torch.Tensor]]


class DeliveryInterrupted(RuntimeError):
    """A delivery that needs every member of its group at once lost one (a member died or hung):
    nothing was loaded, and the push goes out again to the members left."""


class WeightRefused(RuntimeError):
    """A delivered version's bytes do not match what its sender declared; the engine keeps the version it holds."""


class WeightSuperseded(RuntimeError):
    """A delivered version is no longer there to fetch (the store's retention removed it after
    newer ones were published); the newer versions' deliveries follow."""


@dataclass
class Fetched:
    """A delivered version, checked and ready to load into an engine."""

    version: int
    created_at: str
    tensors: list[tuple[str, torch.Tensor]]
    fingerprint: str
    nbytes: int
    files: dict[str, str] = field(default_factory=dict)  # small files read with it (store only), by name


def store_fingerprint(manifest: dict) -> str:
    """The fingerprint of a stored version (or variant): its identity and every shard's checksum,
    in shard order. The publisher computes it from the manifest it wrote, an engine from the
    manifest whose shards it checked while loading."""
    return fingerprint(
        manifest["version"], manifest["created_at"], [manifest["shards"][s] for s in sorted(manifest["shards"])]
    )


class WeightTransport(ABC):
    """Both ends of one way versions move from the learner to the engines."""

    type: ClassVar[str]

    def __init__(
        self,
        cfg: WeightsConfig,
        store: WeightStore,
        variants: list[str],
        engine_dtype: torch.dtype,
        put: Callable[[object], object] | None = None,
        get: Callable[[list], list] | None = None,
        host: str = "127.0.0.1",
    ):
        self.cfg, self.store, self.variants, self.engine_dtype = cfg, store, variants, engine_dtype
        # The object store's put and get (Ray's, handed in by the actors), for transports that move
        # bytes through it. `put` copies the bytes it is given into the store (as Ray's does), so
        # the sender packs every bucket of every version in the same staging memory.
        self.put, self.get = put, get
        self.host = host  # this node's address, for a transport whose sender hosts a rendezvous
        self.corrupt_bucket: int | None = None  # test hook (engine side): damage this bucket of the next fetch

    # ---- learner rank 0 ------------------------------------------------------------------
    @abstractmethod
    def publish(self, version: int, created_at: str, named: Named, files: dict[str, str], snapshot: bool) -> Future:
        """Hand one version (engine-dtype host tensors, streamed) to the transport. The tensors are
        given away, copies the caller will not change (`named_full_tensors(dtype)` makes them): the
        transport may keep them. The future's result is the `Publication` (its `delivery` is what
        the engines are sent). `snapshot`: the version must also be in the store on disk, durably."""

    def wait_persisted(self) -> None:
        """Block until every store write this transport queued is durable (raises what one raised)."""
        return None  # a transport that queues no writes has nothing to wait for

    def shares(self, snapshot: bool) -> bool:
        """Whether every learner rank publishes its share of a version (`shares`), each through
        its own transport, the parts merged into one delivery (`merge_publications`); else rank 0
        publishes it all. The same answer on every rank (their transports share the config)."""
        return False

    def send(self, delivery: Delivery) -> None:
        """Blocking, for a delivery marked `sender`: rank 0's part of its push, run while
        the engines of its `seat` fetch it. Transports whose engines fetch on their own have none."""
        return None

    # ---- engine --------------------------------------------------------------------------
    @abstractmethod
    def fetch(self, delivery: Delivery, variant: str, reader: str) -> Fetched:
        """Blocking: the delivered version's tensors for an engine of `variant`, checked against
        the sender's declaration (`WeightRefused` if they do not match)."""

    def decline(self, delivery: Delivery, variant: str) -> None:
        """Blocking: the engine takes none of this delivery's bytes (it holds the version already).
        A transport whose sender waits for every engine of the push takes part all the same."""
        return None


class StoreTransport(WeightTransport):
    """`filesystem`: every version is written to the store; engines load it from there, checking
    each shard's checksum. Between durable snapshots the shards are not fsynced."""

    type = "filesystem"

    def publish(self, version, created_at, named, files, snapshot) -> Future:
        state = {name: tensor.cpu() for name, tensor in named}  # a learner's GPU tensors to the host
        written = self.store.publish_async(version, state, files=files, created_at=created_at, durable=snapshot)
        publication: Future = Future()

        def delivered(write: Future) -> None:
            try:
                stats = write.result()
                delivery = stored_delivery(self.store, version, self.variants, files)
                if delivery.created_at != created_at:
                    raise WeightIntegrityError(f"version {version} in the store is not the one just written")
                publication.set_result(
                    Publication(delivery, stats["seconds"], stats["bytes"], stats["variant_seconds"])
                )
            except BaseException as exc:  # the learner's wait_published raises it
                publication.set_exception(exc)

        written.add_done_callback(delivered)
        return publication

    def fetch(self, delivery, variant, reader) -> Fetched:
        # The files stored beside the version (the probe) where the delivery does not carry them
        # (`stored_delivery`'s): read and checked once, here.
        files = () if delivery.files else None
        return fetch_stored(self.store, delivery.version, variant, reader, created_at=delivery.created_at, files=files)


def stored_delivery(
    store: WeightStore, version: int, variants: Iterable[str], files: dict[str, str] | None = None
) -> Delivery:
    """Version `version` of the store as a `filesystem` delivery: its identity and each variant's
    fingerprint from the manifests on disk, and `files` (the probe) where the caller has them (a
    fetch reads those stored beside the version, checked). `FileNotFoundError` if retention
    removed it."""
    manifest = store.manifest(version)
    links = {
        v: VariantLink(store_fingerprint(manifest if v == "full" else store.manifest(version, v))) for v in variants
    }
    return Delivery(StoreTransport.type, version, manifest["created_at"], links, files or {})


def fetch_stored(
    store: WeightStore,
    version: int,
    variant: str,
    reader: str,
    created_at: str | None = None,
    files: Iterable[str] | None = (),
) -> Fetched:
    """A stored version's `variant` (`full`, `int8`), every shard checked, under a lease for
    `reader`, with the text `files` published beside it (None: all of them). `WeightSuperseded` if retention removed
    it; `WeightRefused` if its bytes fail their checksums or it is not the version `created_at` names."""
    stored_variant = None if variant == "full" else variant
    try:
        store.acquire(version, reader)  # retention keeps it while it is read
    except FileNotFoundError:
        raise WeightSuperseded(f"version {version} has left the store (newer versions were published)") from None
    try:
        manifest = store.manifest(version, stored_variant)
        if created_at is not None and manifest["created_at"] != created_at:
            raise WeightRefused(
                f"version {version} in the store was created at {manifest['created_at']}, "
                f"the delivery's at {created_at}"
            )
        tensors = store.load(version, variant=stored_variant)
        names = store.manifest(version).get("files", {}) if files is None else files
        texts = {name: text for name in names if (text := store.read_file(version, name)) is not None}
    except WeightIntegrityError as exc:
        raise WeightRefused(str(exc)) from exc
    finally:
        store.release(version, reader)
    return Fetched(
        version,
        manifest["created_at"],
        list(tensors.items()),
        store_fingerprint(manifest),
        manifest["total_bytes"],
        texts,
    )


class ObjectStoreTransport(WeightTransport):
    """`direct`: each version goes from the learner's rank 0 to every engine without disk, as
    layer-aligned buckets of engine-dtype bytes in the object store (`put`/`get` handed in),
    each checked by its checksum before the engine loads any of them. Every
    `persist_every`-th version (and any `snapshot`) is also written to the store on disk.

    With `delta: sparse` the full-precision variant travels as a *chain*: the newest whole
    version (every `full_every`-th, and every snapshot) and the sparse deltas since, each a
    packed version of its own. An engine fetches only the links after the version it holds (in
    steady state: the newest delta), rebuilds the full tensors and proves them by
    `sparse_delta.fingerprint_tensors`, which the sender computed over the same tensors."""

    type = "direct"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.writes: list[Future] = []  # store writes of persisted versions, in order
        self.sparse = self._sparse()
        # Sender: each variant's bucket memory, refilled for every bucket (`put` copies it away).
        self.staging = {variant: Staging(reuse=True) for variant in self.variants}
        # Sender, `delta: sparse`: the previous version's full-precision tensors and the chain's links.
        self.previous: dict[str, torch.Tensor] | None = None
        self.chain: list[VariantLink] = []
        # Engine, `delta: sparse`: the identity and tensors of the version it rebuilt last.
        self.held: tuple[tuple[int, str], dict[str, torch.Tensor]] | None = None

    def _sparse(self) -> bool:
        transport = self.cfg.transport
        return isinstance(transport, DirectTransport) and transport.delta == "sparse"

    def shares(self, snapshot: bool) -> bool:
        # Not a version the store keeps (one writer holds it whole), nor a sparse chain (its links
        # and fingerprint are over the whole version).
        transport = self.cfg.transport
        return (
            isinstance(transport, DirectTransport)
            and transport.senders == "every_rank"
            and not self.sparse
            and not snapshot
        )

    def publish(self, version, created_at, named, files, snapshot) -> Future:
        self._reap_writes()
        transport, put = self.cfg.transport, self.put
        if not isinstance(transport, DirectTransport | CollectiveTransport):
            raise RuntimeError(f"the {self.type} transport was built for weights.transport.type {transport.type}")
        if put is None:
            raise RuntimeError(f"the {self.type} transport publishes through the object store: `put` was not handed in")
        start = time.perf_counter()
        bucket_bytes = int(transport.bucket_mb * (1 << 20))
        sparse = self.sparse and "full" in self.variants  # only a direct transport sends deltas (`_sparse`)
        whole = (
            not sparse
            or self.previous is None
            or snapshot
            or (isinstance(transport, DirectTransport) and version % transport.full_every == 0)
        )
        # Each variant is made once here, for every engine of its kind.
        packers = {
            variant: VersionPacker(
                version, created_at, variant, self.engine_dtype, bucket_bytes, put, self.staging[variant]
            )
            for variant in self.variants
        }
        kept, current = {}, {}
        for name, tensor in checkpoint_tensors(named):  # an MoE's stacked experts split as its folder has them
            if snapshot or sparse:  # kept past this call: on the host (else the packers copy it there, pinned)
                tensor = tensor.cpu()
            for variant, packer in packers.items():
                if sparse and variant == "full" and not whole:
                    assert self.previous is not None  # not whole: the previous version's tensors are held
                    for part, value in sparse_delta.encode(name, self.previous.get(name), tensor):
                        packer.add(part, value)
                else:
                    packer.add(name, tensor)
            if snapshot:
                kept[name] = tensor
            if sparse:  # the next version's delta is taken against it
                current[name] = tensor
        if snapshot:
            self.writes.append(self.store.publish_async(version, kept, files=files, created_at=created_at))
        variants, variant_seconds = {}, {}
        for variant, packer in packers.items():
            manifest, buckets = packer.finish()
            variant_seconds[f"direct-{variant}"] = packer.seconds
            link = VariantLink(manifest.fingerprint, manifest, tuple(buckets))
            if sparse and variant == "full":
                self.chain = [link] if whole else [*self.chain, link]
                fp = sparse_delta.fingerprint_tensors(version, created_at, sorted(current.items()))
                link = VariantLink(fp, chain=tuple(self.chain), whole=whole)
            variants[variant] = link
        if sparse:
            self.previous = current
        delivery = Delivery(self.type, version, created_at, variants, files)
        seconds, nbytes = time.perf_counter() - start, sum(p.manifest.total_bytes for p in packers.values())
        return done_future(Publication(delivery, seconds, nbytes, variant_seconds))

    def _reap_writes(self) -> None:
        """Store writes queued by earlier versions: a failed one fails the learner with its cause."""
        while self.writes and self.writes[0].done():
            self.writes.pop(0).result()

    def wait_persisted(self) -> None:
        while self.writes:
            self.writes.pop(0).result()

    def fetch(self, delivery, variant, reader) -> Fetched:
        mine = delivery.link(variant)
        if mine.chain:
            return self._fetch_chain(delivery, mine)
        tensors, fp, manifest = self._verified(mine)
        return Fetched(manifest.version, manifest.created_at, tensors, fp, manifest.total_bytes)

    def _verified(self, link: VariantLink) -> tuple[list[tuple[str, torch.Tensor]], str, DeliveryManifest]:
        if self.get is None:
            raise RuntimeError(f"the {self.type} transport fetches from the object store: `get` was not handed in")
        manifest = link.packed()
        payloads = self.get(list(link.buckets))  # shared memory on this node: no copy
        corrupt, self.corrupt_bucket = self.corrupt_bucket, None
        try:
            tensors, fp = verified_tensors(manifest, payloads, None if corrupt is None else _flip_byte_of(corrupt))
        except DeliveryError as exc:
            raise WeightRefused(str(exc)) from exc
        return tensors, fp, manifest

    def _fetch_chain(self, delivery: Delivery, mine: VariantLink) -> Fetched:
        """Rebuild the version from the links after the one this engine holds (or from the whole one)."""
        chain = mine.chain
        identities = [(link.packed().version, link.packed().created_at) for link in chain]
        held_identity, held = self.held or (None, {})
        first = identities.index(held_identity) + 1 if held_identity in identities else 0
        tensors = held if first else {}  # the links after the one held, or all from the whole one
        moved = 0
        for link in chain[first:]:
            parts, _, manifest = self._verified(link)
            moved += manifest.total_bytes
            try:
                tensors = sparse_delta.apply(tensors, parts)
            except (KeyError, ValueError) as exc:
                raise WeightRefused(f"version {manifest.version}: {exc}") from exc
        # Tensors sent whole stay views of their (read-only) buckets until a later link replaces
        # them; `apply` never writes into them, it copies a tensor before changing its elements.
        version, created_at = delivery.identity
        fp = sparse_delta.fingerprint_tensors(version, created_at, sorted(tensors.items()))
        if fp != mine.fingerprint:
            raise WeightRefused(
                f"version {version}: the weights rebuilt from {len(chain) - first} link(s) do not "
                f"match the sender's (fingerprint {fp[:12]} vs {mine.fingerprint[:12]})"
            )
        self.held = ((version, created_at), tensors)
        return Fetched(version, created_at, list(tensors.items()), fp, moved)


def _flip_byte_of(bucket: int):
    def corrupt(index: int, payload):
        if index != bucket:
            return payload
        damaged = bytearray(memoryview(payload).cast("B"))
        damaged[len(damaged) // 2] ^= 0xFF
        return damaged

    return corrupt
