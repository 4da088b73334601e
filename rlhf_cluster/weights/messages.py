"""The messages of the weight path, typed: what a publication hands the driver, what a push hands
each engine, what each engine answers. They cross Ray (pickled), never as dicts read by key.

    learner rank 0 --Publication--> driver (WeightSync) --Delivery (+ Seat)--> engine --Receipt--> driver

A `Delivery` names one version by its identity (number, creation time: after a rollback the same
number is published again with other weights) and, per engine variant (`full`, `int8`), what an
engine of that variant fetches (`VariantLink`) and the fingerprint it must prove its load with.
A `Receipt` says what the engine did with it (loaded, held already, refused, superseded,
interrupted), whether that is proven and by whose declaration (the sender's, or the store's
manifest), and carries the probe report of the load where the version had a probe.
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
class ProbeMismatch:
    """How far an engine's log-probs of the probe tokens are from the learner's, with
    `delta = log p_learner - log p_engine` over its `tokens`: `k1 = mean(-delta)`,
    `k3 = mean(exp(delta) - 1 - delta)` and the largest |delta|."""

    k1: float
    k3: float
    max_abs_diff: float
    tokens: int


@dataclass(frozen=True)
class ProbeReport:
    """An engine's scores of the version's probe against the learner's: how far apart the two are
    right after the load."""

    worker: str
    pid: int
    version: int
    variant: str
    created_at: str
    sync_seconds: float
    sync_bytes: int
    mismatch: ProbeMismatch

    def record(self) -> dict[str, Any]:
        """One line of the run's probes.jsonl (the mismatch figures at the top level)."""
        flat = asdict(self)
        return {**{k: v for k, v in flat.items() if k != "mismatch"}, **flat["mismatch"]}


ReceiptStatus = Literal["loaded", "held", "refused", "superseded", "interrupted"]
# Who declared the fingerprint a load was proven against: the delivery's `sender` (a push), or
# the `store`'s own manifest on disk (a version an engine read from the store itself).
ProvenBy = Literal["sender", "store"]


@dataclass(frozen=True)
class Receipt:
    """An engine's answer to a delivery. `loaded`: the engine now serves it, with the bytes whose
    `fingerprint` it reports; `held`: it held that version already (the receipt of the load that
    brought it); `refused`: its bytes did not match what the sender declared (`reason`), the
    engine keeps `held_version`; `superseded`: gone from the store, newer versions follow;
    `interrupted`: a member of the push's group failed, the push goes out again. `proven_by`:
    who declared the fingerprint the load matched (None: not proven); made by `judged`."""

    worker: str
    version: int
    variant: str
    status: ReceiptStatus
    fingerprint: str | None = None
    reason: str = ""
    held_version: int | None = None
    seconds: float = 0.0
    bytes: int = 0
    sent_fingerprint: str | None = None  # what the delivery declared for the variant
    proven_by: ProvenBy | None = None
    probe: ProbeReport | None = None

    @classmethod
    def judged(
        cls,
        worker: str,
        delivery: Delivery,
        variant: str,
        status: ReceiptStatus,
        by: ProvenBy,
        fingerprint: str | None = None,
        **details: Any,
    ) -> Receipt:
        """An engine's receipt for `delivery`, and the one place a load is judged: proven (by
        `by`, who declared the delivery's fingerprint) when the engine loaded or held the
        version and the `fingerprint` of the bytes it reports is the one `delivery` declared for
        `variant`. `details`: the other fields (reason, held_version, seconds, bytes, probe)."""
        sent = delivery.link(variant).fingerprint
        proven = status in ("loaded", "held") and fingerprint is not None and fingerprint == sent
        return cls(
            worker,
            delivery.version,
            variant,
            status,
            fingerprint,
            sent_fingerprint=sent,
            proven_by=by if proven else None,
            **details,
        )

    @property
    def loaded(self) -> bool:
        return self.status == "loaded"

    @property
    def proven(self) -> bool:
        """Loaded or held, with the bytes declared (by `proven_by`)."""
        return self.proven_by is not None
