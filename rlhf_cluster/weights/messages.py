"""The messages of the weight path, typed: what a publication hands the driver, what a push hands
each engine, what each engine answers. They cross Ray (pickled), never as dicts read by key.

    learner rank 0 --Publication--> driver (WeightSync) --Delivery (+ Seat)--> engine --Receipt--> driver

A `Delivery` names one version by its identity (number, creation time: after a rollback the same
number is published again with other weights) and, per engine variant (`full`, `int8`), what an
engine of that variant fetches (`VariantLink`) and the fingerprint it must prove its load with.
A `Receipt` says what the engine did with it (loaded, held already, refused, superseded,
interrupted), and carries the probe report of the load where the version had a probe.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from rlhf_cluster.weights.buckets import DeliveryManifest


@dataclass(frozen=True)
class VariantLink:
    """What an engine of one variant fetches: a stored version (nothing but the fingerprint), a
    packed one (`manifest` and the object store's `buckets`, or the sender's broadcasts), or a
    sparse chain of packed links after the newest whole version (`chain`, `whole`)."""

    fingerprint: str
    manifest: DeliveryManifest | None = None
    buckets: tuple[Any, ...] = ()  # object store references (`direct`); empty where the sender broadcasts
    chain: tuple[VariantLink, ...] = ()
    whole: bool = False

    def packed(self) -> DeliveryManifest:
        """The manifest of a packed link (a stored one has none: the store's manifest is on disk)."""
        if self.manifest is None:
            raise ValueError("this variant was stored, not packed: it has no delivery manifest")
        return self.manifest


@dataclass(frozen=True)
class GroupAddress:
    """Where the sender's broadcast group meets: rank 0's rendezvous store and its backend."""

    host: str
    port: int
    backend: str


@dataclass(frozen=True)
class Seat:
    """One member's place in a push's broadcast group: the group's number, its rank, the size."""

    group: int
    rank: int
    size: int


@dataclass(frozen=True)
class Delivery:
    """One version, as the engines of every variant fetch it through `transport`."""

    transport: str
    version: int
    created_at: str
    variants: Mapping[str, VariantLink]
    files: Mapping[str, str] = field(default_factory=dict)  # small text files (the probe), by name
    sender: bool = False  # the sender (rank 0) takes part in every push (`collective`)
    group: GroupAddress | None = None
    seat: Seat | None = None

    @property
    def identity(self) -> tuple[int, str]:
        return self.version, self.created_at

    def link(self, variant: str) -> VariantLink:
        try:
            return self.variants[variant]
        except KeyError:
            raise KeyError(
                f"version {self.version} was delivered for variants {sorted(self.variants)}, not {variant!r}"
            ) from None

    def seated(self, seat: Seat) -> Delivery:
        return replace(self, seat=seat)

    def without_payloads(self) -> Delivery:
        """The same delivery with no bucket references: what a receipt log or a store may keep
        (references would pin the buckets in the object store)."""
        return replace(self, variants={v: _bare(link) for v, link in self.variants.items()})


def _bare(link: VariantLink) -> VariantLink:
    return replace(link, buckets=(), chain=tuple(_bare(c) for c in link.chain))


@dataclass(frozen=True)
class Publication:
    """A published version: the `delivery` to push, and what publishing it cost on rank 0."""

    delivery: Delivery
    seconds: float
    bytes: int
    variant_seconds: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ProbeReport:
    """An engine's scores of the version's probe against the learner's: how far apart the two are
    right after the load (`mismatch`: k1, k3, max_abs_diff, tokens)."""

    worker: str
    pid: int
    version: int
    variant: str
    created_at: str
    sync_seconds: float
    sync_bytes: int
    mismatch: Mapping[str, float]

    @property
    def k3(self) -> float:
        return float(self.mismatch["k3"])

    @property
    def max_abs_diff(self) -> float:
        return float(self.mismatch["max_abs_diff"])

    def record(self) -> dict[str, Any]:
        """One line of the run's probes.jsonl (the mismatch figures at the top level)."""
        flat = asdict(self)
        return {**{k: v for k, v in flat.items() if k != "mismatch"}, **dict(self.mismatch)}


ReceiptStatus = Literal["loaded", "held", "refused", "superseded", "interrupted"]


@dataclass(frozen=True)
class Receipt:
    """An engine's answer to a delivery. `loaded`: the engine now serves it, proven by
    `fingerprint`; `held`: it held that version already (proven before); `refused`: its bytes did
    not match what the sender declared (`reason`), the engine keeps `held_version`; `superseded`:
    gone from the store, newer versions follow; `interrupted`: a member of the push's group failed,
    the push goes out again."""

    worker: str
    version: int
    variant: str
    status: ReceiptStatus
    fingerprint: str | None = None
    reason: str = ""
    held_version: int | None = None
    seconds: float = 0.0
    bytes: int = 0
    sent_fingerprint: str | None = None  # what the sender declared, set where the receipt is recorded
    probe: ProbeReport | None = None

    @property
    def loaded(self) -> bool:
        return self.status == "loaded"

    @property
    def proven(self) -> bool:
        """Loaded or held, and the fingerprint the engine reports is the one the sender declared."""
        return self.status in ("loaded", "held") and self.fingerprint == self.sent_fingerprint

    def against(self, delivery: Delivery) -> Receipt:
        """This receipt with the fingerprint `delivery` declared for its variant."""
        return replace(self, sent_fingerprint=delivery.link(self.variant).fingerprint)
