"""Every learner rank sends its share of a version (`weights.transport.senders: every_rank`).

The ranks gather every tensor together anyway (FSDP2's all-gather); instead of rank 0 casting,
checksumming and putting all of them, each rank takes a share: `Dealer` deals the version's
units (a decoder layer, or a top-level module: what a bucket never splits) to the ranks in stream
order, each to the rank with the fewest bytes so far, the same way on every rank (no message).
Each rank packs its share as a version of its own; `merge_publications` joins the ranks'
publications into one delivery whose manifest lists every rank's buckets in rank order, so an
engine fetches, checks and proves the whole version exactly as from one sender.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from rlhf_cluster.weights.buckets import DeliveryManifest, layer_of
from rlhf_cluster.weights.messages import Publication, VariantLink


class Dealer:
    """Which rank sends each tensor of one version: by unit (`layer_of`), balanced by the bytes
    in the engine dtype, deterministic over the tensors' order (every rank sees the same)."""

    def __init__(self, world_size: int, rank: int, dtype: torch.dtype):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a group of {world_size}")
        self.rank, self.dtype = rank, dtype
        self.loads = [0] * world_size  # bytes dealt to each rank so far
        self._owners: dict[str, int] = {}  # unit -> rank

    def owner(self, name: str, tensor: torch.Tensor) -> int:
        """The rank that sends `name` (call once per tensor, in the stream's order)."""
        unit = layer_of(name)
        owner = self._owners.get(unit)
        if owner is None:
            owner = self._owners[unit] = min(range(len(self.loads)), key=lambda r: (self.loads[r], r))
        size = self.dtype.itemsize if tensor.is_floating_point() else tensor.element_size()
        self.loads[owner] += tensor.numel() * size
        return owner

    def mine(self, name: str, tensor: torch.Tensor) -> bool:
        return self.owner(name, tensor) == self.rank


def merge_publications(parts: Sequence[Publication]) -> Publication:
    """One publication of a version from the ranks' publications of their shares (rank order):
    per variant, one manifest of every part's buckets in order and its fingerprint; the files
    (the probe) rank 0's; the seconds the slowest part's."""
    if not parts:
        raise ValueError("no parts to merge")
    first = parts[0].delivery
    for part in parts[1:]:
        d = part.delivery
        if (d.identity, d.transport, sorted(d.variants)) != (first.identity, first.transport, sorted(first.variants)):
            raise ValueError(
                f"the parts are not of one version: {d.transport} {d.identity} {sorted(d.variants)} vs "
                f"{first.transport} {first.identity} {sorted(first.variants)}"
            )
    variants = {}
    for variant in first.variants:
        links = [part.delivery.link(variant) for part in parts]
        if any(link.chain for link in links):
            raise ValueError(f"variant {variant}: a sparse chain cannot be merged from parts")
        manifest = DeliveryManifest(
            first.version, first.created_at, variant, [b for link in links for b in link.packed().buckets]
        )
        variants[variant] = VariantLink(
            manifest.fingerprint, manifest, tuple(b for link in links for b in link.buckets)
        )
    seconds: dict[str, float] = {}
    for part in parts:
        for key, value in part.variant_seconds.items():
            seconds[key] = max(seconds.get(key, 0.0), value)
    return Publication(
        replace(first, variants=variants), max(p.seconds for p in parts), sum(p.bytes for p in parts), seconds
    )
