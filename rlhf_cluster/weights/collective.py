"""The `collective` transport: every version broadcast from the learner's rank 0 to the engines
over a process group of their own (NCCL between GPUs, gloo on CPU).

    learner rank 0:  publish: pack layer-aligned, checksummed buckets (as `direct` does) and keep
                     them here; the delivery carries the manifests and the group's address
                     send(delivery): rank 0's part of the push: a header, then one broadcast per bucket
    engine:          fetch(delivery): take part in the same broadcasts, keep its variant's buckets,
                     check each against the manifest, unpack

The group is not the process's default one (the learner's ranks and vLLM each have theirs): it is
built from a `TCPStore` that rank 0 hosts, with a `ProcessGroupGloo` / `ProcessGroupNCCL` made
directly. Who is in it is the push's business: the driver seats rank 0 and every engine the push
reaches (`Delivery.seat`: group number, rank, size) and numbers the group anew whenever that
set changes (an engine joined, retired or was replaced) or a push was interrupted; each member
builds the numbered group on its first use. A broadcast that a member does not join in time
(it died, or hung) fails every other member within `timeout_s` (`DeliveryInterrupted`), and the
driver pushes again to the members left.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist

from rlhf_cluster.config import CollectiveTransport
from rlhf_cluster.fileio import done_future
from rlhf_cluster.weights.buckets import DeliveryError, Staging, check_bucket, fingerprint, unpack_bucket
from rlhf_cluster.weights.messages import Delivery, GroupAddress, Publication, Seat
from rlhf_cluster.weights.transports import (
    DeliveryInterrupted,
    Fetched,
    ObjectStoreTransport,
    WeightRefused,
    WeightSuperseded,
    _flip_byte_of,
)

SENT, MISSING = 1, 2  # the header's status: the buckets follow, or the sender no longer holds the version
CONNECT_TIMEOUT = dt.timedelta(seconds=10)
OUTBOX_KEPT = 2  # versions rank 0 keeps packed: the newest (for joiners) and one whose push may still come


class BroadcastGroup:
    """One process's membership of the weight broadcast group: rank 0 hosts the rendezvous store,
    the engines connect to it. The group is rebuilt when a delivery seats this process in a group
    of another number (or at another rank 0)."""

    def __init__(self, backend: str, timeout_s: float):
        self.backend, self.timeout = backend, dt.timedelta(seconds=timeout_s)
        self.server: dist.TCPStore | None = None  # rank 0's rendezvous store
        self.key: tuple | None = None
        self.group: dist.ProcessGroupNCCL | dist.ProcessGroupGloo | None = None  # built by `join`

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def host(self, host: str) -> GroupAddress:
        """Rank 0: the rendezvous store's address, the store started on first use."""
        if self.server is None:
            self.server = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=self.timeout)
        return GroupAddress(host, self.server.port, self.backend)

    def join(self, address: GroupAddress | None, seat: Seat | None) -> None:
        """Be in the group `seat` names (built collectively by all its members on first use)."""
        if address is None or seat is None:
            raise ValueError("a collective delivery reaches its members with the group's address and their seat")
        key = (address.host, address.port, seat.group, seat.rank, seat.size)
        if key == self.key:
            return
        self.key, self.group = None, None
        self.backend = address.backend  # rank 0 chose it (`auto`: nccl where it has CUDA); every member follows
        try:
            store = self.server if seat.rank == 0 else None
            if store is None:
                # Rank 0 hosts the store from its first publication on: a store that does not
                # answer at once is a sender that is gone (its group is never built).
                store = dist.TCPStore(
                    address.host, address.port, is_master=False, timeout=min(self.timeout, CONNECT_TIMEOUT)
                )
                store.set_timeout(self.timeout)
            prefixed = dist.PrefixStore(f"weights/group{seat.group}", store)
            if self.backend == "nccl":
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = self.timeout
                self.group = dist.ProcessGroupNCCL(prefixed, seat.rank, seat.size, options)
            else:
                self.group = dist.ProcessGroupGloo(prefixed, seat.rank, seat.size, self.timeout)
        except (RuntimeError, dist.DistError) as exc:
            raise DeliveryInterrupted(f"weight group {seat.group}: could not be built: {exc}") from exc
        self.key = key

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Rank 0's `tensor` into every member's (bounded by the timeout; a failure leaves the group)."""
        self.wait(self.start(tensor))

    def start(self, tensor: torch.Tensor):
        """Begin broadcasting rank 0's `tensor` into every member's; `wait` for it. Broadcasts
        started one after another complete in that order on every member."""
        if self.group is None:
            raise RuntimeError("weight broadcast started before `join` built this process's group")
        options = dist.BroadcastOptions()
        options.rootRank = 0
        try:
            return self.group.broadcast([tensor], options)  # type: ignore[union-attr]  # torch stubs: Backend lacks broadcast
        except (RuntimeError, dist.DistError) as exc:
            self._failed(exc)

    def wait(self, work) -> None:
        try:
            work.wait(self.timeout)
        except (RuntimeError, dist.DistError) as exc:
            self._failed(exc)

    def _failed(self, exc: BaseException):
        self.key, self.group = None, None  # the next push builds a new group
        raise DeliveryInterrupted(f"weight broadcast failed: {exc}") from exc


class BroadcastGroupTransport(ObjectStoreTransport):
    """`collective`: the object store transport's buckets and snapshots, moved by broadcasts of a
    group of rank 0 and the engines of each push instead of through Ray's object store."""

    type = "collective"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        transport = self.cfg.transport
        if not isinstance(transport, CollectiveTransport):
            raise RuntimeError(f"the collective transport was built for weights.transport.type {transport.type}")
        backend = transport.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        self.group = BroadcastGroup(backend, transport.timeout_s)
        self.put = lambda payload: payload  # the packer's buckets stay in this process...
        self.staging = {variant: Staging(reuse=False) for variant in self.variants}  # ...each in memory of its own
        self.outbox: OrderedDict[tuple[int, str], dict[str, list[np.ndarray]]] = OrderedDict()
        self._outbox_lock = threading.Lock()  # publish (the step's thread) and send (the weights thread)

    def _sparse(self) -> bool:
        return False  # deltas need the object store's chain of links

    def shares(self, snapshot: bool) -> bool:
        return False  # one sender seated in each push's group

    # ---- learner rank 0 ------------------------------------------------------------------
    def publish(self, version, created_at, named, files, snapshot):
        publication: Publication = super().publish(version, created_at, named, files, snapshot).result()
        packed = publication.delivery
        # The payloads themselves (`put` kept them) stay here; the engines receive them broadcast.
        buckets = {variant: list(link.buckets) for variant, link in packed.variants.items()}
        with self._outbox_lock:
            self.outbox[(version, created_at)] = buckets
            while len(self.outbox) > OUTBOX_KEPT:
                self.outbox.popitem(last=False)
        delivery = replace(
            packed.without_payloads(), transport=self.type, sender=True, group=self.group.host(self.host)
        )
        return done_future(replace(publication, delivery=delivery))

    def send(self, delivery: Delivery) -> None:
        self.group.join(delivery.group, delivery.seat)
        identity = delivery.identity
        with self._outbox_lock:
            buckets = self.outbox.get(identity)
            if buckets is not None:  # older versions will not be pushed again
                while next(iter(self.outbox)) != identity:
                    self.outbox.popitem(last=False)
        device = self.group.device
        self.group.broadcast(_header(SENT if buckets is not None else MISSING, delivery.version, device))
        if buckets is None:
            return
        # Every bucket's broadcast is started at once: the group's threads keep the wire busy.
        works = [
            self.group.start(torch.from_numpy(payload).to(device))
            for variant in sorted(delivery.variants)
            for payload in buckets[variant]
        ]
        for work in works:
            self.group.wait(work)

    # ---- engine --------------------------------------------------------------------------
    def fetch(self, delivery, variant, reader) -> Fetched:
        manifest = delivery.link(variant).packed()
        corrupt, self.corrupt_bucket = self.corrupt_bucket, None
        damage = None if corrupt is None else _flip_byte_of(corrupt)
        payloads, digests, refused = [], [], None
        # Each bucket is checked as it arrives, while the next ones are still on the wire; a bucket
        # that fails its check refuses the version, once every broadcast of the push is through.
        for index, payload in self._arrivals(delivery, keep=variant):
            if damage is not None:
                payload = damage(index, payload)
            try:
                digests.append(check_bucket(manifest.buckets[index], payload, index))
            except DeliveryError as exc:
                refused = refused or exc
            payloads.append(payload)
        if refused is not None:
            raise WeightRefused(str(refused)) from refused
        tensors = [t for spec, payload in zip(manifest.buckets, payloads) for t in unpack_bucket(spec, payload)]
        fp = fingerprint(manifest.version, manifest.created_at, digests)
        return Fetched(manifest.version, manifest.created_at, tensors, fp, manifest.total_bytes)

    def decline(self, delivery, variant) -> None:
        for _ in self._arrivals(delivery, keep=None):
            pass

    def _arrivals(self, delivery: Delivery, keep: str | None) -> Iterator[tuple[int, np.ndarray]]:
        """This engine's part of the push's broadcasts: every variant's buckets in the sender's
        order, all started at once; yields `keep`'s (index, bytes) as each arrives."""
        self.group.join(delivery.group, delivery.seat)
        device = self.group.device
        header = _header(0, -1, device)
        self.group.broadcast(header)
        status, version = header.tolist()
        if version != delivery.version:
            self.group.key = None  # out of step with the sender: this group is not to be used again
            raise DeliveryInterrupted(
                f"the sender broadcast version {version}, this engine expected {delivery.version}"
            )
        if status == MISSING:
            raise WeightSuperseded(f"version {version} is no longer held by the sender (newer versions follow)")
        arriving = []
        for variant in sorted(delivery.variants):
            for index, spec in enumerate(delivery.link(variant).packed().buckets):
                buffer = torch.empty(spec.nbytes, dtype=torch.uint8, device=device)
                arriving.append((variant == keep, index, buffer, self.group.start(buffer)))
        for kept, index, buffer, work in arriving:
            self.group.wait(work)
            if kept:
                yield index, buffer.cpu().numpy()


def _header(status: int, version: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([status, version], dtype=torch.int64, device=device)
