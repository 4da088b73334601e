"""The engine's receiving end of the weight path: what one engine holds, and how a delivered
version gets in.

    load(delivery)           a pushed version, fetched and checked by its transport, loaded in place
    load_stored(min_version) the store's newest version, as a `filesystem` delivery through `load`
    hold(min_version)        wait until the engine holds a version >= `min_version` (or it was refused)

`WeightReceiver` owns the engine's weight state: the identity and fingerprint of the version it
serves and who proved it, the versions it refused, every in-place swap, the probe score of each
load. Every answer is a `Receipt`, judged where it is made (`Receipt.judged`): loaded, held
already, refused, superseded (gone from the store), interrupted (a member of the push's group
failed). A refused version is counted and the engine keeps serving the one it holds.

Asyncio code without Ray: the generation worker's Ray methods call it, and the unit tests drive it
with a fake engine and real transports. Its figures leave through `ReceiverMetrics`, so this
package knows no metrics registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import torch

from rlhf_cluster.generation.probe import PROBE_FILE, mismatch, parse_probe_file
from rlhf_cluster.weights import WeightStore
from rlhf_cluster.weights.messages import Delivery, ProbeReport, ProvenBy, Receipt, ReceiptStatus
from rlhf_cluster.weights.transports import (
    DeliveryInterrupted,
    WeightRefused,
    WeightSuperseded,
    WeightTransport,
    stored_delivery,
)

if TYPE_CHECKING:
    from rlhf_cluster.generation.engine_outputs import WeightSwap

log = logging.getLogger(__name__)

DELIVERY_WAIT_S = 600.0  # a request waits this long at most for a pushed version it needs


class Engine(Protocol):
    """What the receiver uses of an engine (`VLLMEngine`): the version it serves, an in-place
    load, and log-probs of fixed sequences (the probe)."""

    @property
    def version(self) -> int: ...

    def load_weights(self, version: int, weights: list[tuple[str, torch.Tensor]]) -> WeightSwap: ...

    def logprobs_of_many(self, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]: ...


@dataclass(frozen=True)
class Swap:
    """One in-place load: what it did to the requests in the engine (the engine's `WeightSwap`)
    and what it moved, by which transport, in how long."""

    version: int
    paused_seconds: float
    resumed: int
    aborted: int
    tokens_of_previous: int
    seconds: float
    bytes: int
    transport: str


class ReceiverMetrics:
    """Where the receiver's figures go (the worker's metrics and trace). This base keeps nothing
    (tests, tools); the worker's subclass exports them."""

    def loaded(self, swap: Swap) -> None:
        """A version was loaded in place (`swap`); the engine holds the newest it was given."""

    def refused(self, versions_behind: int) -> None:
        """A delivered version was refused; the engine is `versions_behind` it."""

    def mismatched(self) -> None:
        """A push's bytes (or a load's fingerprint) did not match what its sender declared."""

    def probed(self, report: ProbeReport) -> None:
        """A load's probe was scored."""


class WeightReceiver:
    """One engine's weight state and the loads that change it. `transport`: the job's (pushes
    arrive through it); `stored`: the store's (`filesystem`; the same object in a filesystem
    job), through which the store's versions arrive. `requests`: in batched mode, the lock a
    request holds while it runs, so weights change only between requests."""

    def __init__(
        self,
        engine: Engine,
        store: WeightStore,
        transport: WeightTransport,
        stored: WeightTransport,
        variant: str,
        name: str,
        metrics: ReceiverMetrics | None = None,
        requests: asyncio.Lock | None = None,
        wait_s: float = DELIVERY_WAIT_S,
    ):
        self.engine, self.store, self.variant, self.name = engine, store, variant, name
        self.transport = transport
        self.transports = {t.type: t for t in (stored, transport)}
        self.metrics: ReceiverMetrics = metrics or ReceiverMetrics()
        self.requests, self.wait_s = requests, wait_s
        self.loaded: tuple[int, str] | None = None  # (version, created_at) of the weights in the engine
        self.current: Receipt | None = None  # the receipt of the load that brought them: fingerprint, proof
        self.refused: set[tuple[int, str]] = set()
        # The newest version refused. Requests that need it go on with the version held, as with a
        # refused stored version (the staleness filter judges their samples).
        self.refused_up_to = -1
        self.swaps: list[Swap] = []  # every in-place load, for tests and audits
        self._loading = asyncio.Lock()  # one weight load at a time
        self._delivered = asyncio.Condition()  # the engine's version moved (or a delivery was refused)

    @property
    def fingerprint(self) -> str | None:
        """Of the bytes the engine holds, as the transport that brought them proved them."""
        return None if self.current is None else self.current.fingerprint

    def refused_versions(self) -> list[int]:
        return sorted(v for v, _ in self.refused)

    async def sync(self, min_version: int = 0) -> int:
        """`load_stored`, for callers that need only the version the engine then holds."""
        await self.load_stored(min_version)
        return self.engine.version

    async def load_stored(self, min_version: int = 0) -> Receipt:
        """The store's newest version, as a `filesystem` delivery through the one load path,
        proven by the store's own manifest. A stored version refused once (its bytes fail their
        checksums) is not read again, nor one the engine holds (whichever transport brought it:
        the receipt is that load's, `held`); one that retention removes meanwhile is passed over
        for the newer one."""
        while True:
            latest = self.store.latest_version()
            if latest is None or latest < min_version:
                raise RuntimeError(
                    f"{self.name}: version >= {min_version} requested but the store's newest is {latest}"
                )
            try:
                delivery = await asyncio.to_thread(stored_delivery, self.store, latest, [self.variant])
            except FileNotFoundError:
                continue  # removed by retention after a newer one landed: take that
            if delivery.identity in self.refused:
                return self._receipt(delivery, "refused", "store", reason="refused before")
            if delivery.identity == self.loaded and self.current is not None:
                return replace(self.current, status="held", seconds=0.0, bytes=0, probe=None)
            receipt = await self._load(delivery, "store")
            if receipt.status != "superseded":
                return receipt

    async def load(self, delivery: Delivery) -> Receipt:
        """A pushed version, proven against what its sender declared (see `_load`)."""
        return await self._load(delivery, "sender")

    async def _load(self, delivery: Delivery, by: ProvenBy) -> Receipt:
        """Load a delivered version in place at one token boundary, its bytes fetched and checked
        by the delivery's transport first (the job's, or the store's). Requests in flight keep
        running until the engine loop reaches a token boundary, then continue (or restart) with
        the new weights. Returns the receipt (with the probe report of the load where the version
        has a probe); a version whose bytes do not match what `by` declared is refused and
        counted, and the engine keeps serving the one it holds."""
        transport = self.transports[delivery.transport]
        between_requests = self.requests if self.requests is not None else contextlib.nullcontext()
        async with between_requests, self._loading:
            start = time.perf_counter()
            try:
                if delivery.identity == self.loaded and self.fingerprint == delivery.link(self.variant).fingerprint:
                    await asyncio.to_thread(transport.decline, delivery, self.variant)
                    return self._receipt(delivery, "held", by, fingerprint=self.fingerprint)
                fetched = await asyncio.to_thread(transport.fetch, delivery, self.variant, self.name)
            except DeliveryInterrupted as exc:  # a member of the push's group failed: the push goes out again
                log.warning(f"{self.name}: delivery of version {delivery.version} interrupted: {exc}")
                return self._receipt(delivery, "interrupted", by, reason=str(exc))
            except WeightSuperseded as exc:  # not a fault: a newer version's push is on its way
                return self._receipt(delivery, "superseded", by, reason=str(exc))
            except WeightRefused as exc:
                return await self._refuse(delivery, by, exc)
            swap = await asyncio.to_thread(self.engine.load_weights, fetched.version, fetched.tensors)
            nbytes, fingerprint = fetched.nbytes, fetched.fingerprint
            probe = delivery.files.get(PROBE_FILE) or fetched.files.get(PROBE_FILE)  # (a stored version's: on disk)
            del fetched
            seconds = time.perf_counter() - start
            receipt = self._receipt(delivery, "loaded", by, fingerprint=fingerprint, seconds=seconds, nbytes=nbytes)
            self.loaded, self.current = delivery.identity, receipt
            self._record_swap(delivery.version, swap, seconds, nbytes, transport.type)
        async with self._delivered:
            self._delivered.notify_all()
        if not receipt.proven:  # the transport let bytes through that are not the ones declared
            self.metrics.mismatched()
            log.warning(
                f"{self.name}: loaded version {receipt.version} with fingerprint {receipt.fingerprint}, "
                f"the {by} declared {(receipt.sent_fingerprint or '')[:12]}"
            )
        if probe is not None:
            receipt = replace(receipt, probe=await self._score_probe(delivery, probe, seconds, nbytes))
        return receipt

    async def _refuse(self, delivery: Delivery, by: ProvenBy, exc: Exception) -> Receipt:
        """Count and log a refused version; requests that need it go on with the version held."""
        if self.transports[delivery.transport] is self.transport:  # a push's bytes (not the store's)
            self.metrics.mismatched()
        self.refused.add(delivery.identity)
        self.refused_up_to = max(self.refused_up_to, delivery.version)
        self.metrics.refused(max(0, delivery.version - self.engine.version))
        log.warning(
            f"{self.name}: refused {delivery.transport} version {delivery.version}: {exc}; keeping version "
            f"{self.engine.version}"
        )
        async with self._delivered:
            self._delivered.notify_all()
        return self._receipt(delivery, "refused", by, reason=str(exc))

    def _receipt(
        self,
        delivery: Delivery,
        status: ReceiptStatus,
        by: ProvenBy,
        fingerprint: str | None = None,
        reason: str = "",
        seconds: float = 0.0,
        nbytes: int = 0,
    ) -> Receipt:
        return Receipt.judged(
            self.name,
            delivery,
            self.variant,
            status,
            by,
            fingerprint=fingerprint,
            reason=reason,
            held_version=self.engine.version,
            seconds=seconds,
            bytes=nbytes,
        )

    async def hold(self, min_version: int) -> None:
        """Until the engine holds a version >= `min_version` (pushed by the driver, or refused),
        waiting at most `wait_s` (then `TimeoutError`, naming what the engine holds)."""
        async with self._delivered:
            try:
                async with asyncio.timeout(self.wait_s):
                    await self._delivered.wait_for(lambda: max(self.engine.version, self.refused_up_to) >= min_version)
            except TimeoutError:
                raise TimeoutError(
                    f"{self.name}: no delivery of version >= {min_version} within {self.wait_s:g} s "
                    f"(the engine holds {self.engine.version})"
                ) from None

    def _record_swap(self, version: int, swap: WeightSwap, seconds: float, nbytes: int, transport: str) -> None:
        figures = (swap.paused_seconds, swap.resumed, swap.aborted, swap.tokens_of_previous)
        record = Swap(version, *figures, seconds, nbytes, transport)
        self.swaps.append(record)
        self.metrics.loaded(record)

    async def _score_probe(self, delivery: Delivery, text: str, seconds: float, nbytes: int) -> ProbeReport:
        """Score the version's probe with the engine and compare with the learner's log-probs."""
        probe, learner_logprobs = parse_probe_file(text)
        engine_logprobs = await asyncio.to_thread(self.engine.logprobs_of_many, probe.prompt_ids, probe.response_ids)
        report = ProbeReport(
            worker=self.name,
            pid=os.getpid(),
            version=delivery.version,
            variant=self.variant,
            created_at=delivery.created_at,
            sync_seconds=seconds,
            sync_bytes=nbytes,
            mismatch=mismatch(learner_logprobs, engine_logprobs),
        )
        self.metrics.probed(report)
        return report
