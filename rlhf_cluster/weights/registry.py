"""Which transport class serves each `weights.transport` config type, and building one."""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf_cluster.config import CollectiveTransport, DirectTransport, FilesystemTransport, WeightsConfig
from rlhf_cluster.weights.collective import BroadcastGroupTransport
from rlhf_cluster.weights.store import WeightStore
from rlhf_cluster.weights.transports import ObjectStoreTransport, StoreTransport, WeightTransport

TRANSPORTS: dict[type, type[WeightTransport]] = {
    FilesystemTransport: StoreTransport,
    DirectTransport: ObjectStoreTransport,
    CollectiveTransport: BroadcastGroupTransport,
}


def build_transport(
    cfg: WeightsConfig,
    store: WeightStore,
    variants: list[str],
    engine_dtype: torch.dtype,
    put: Callable[[object], object] | None = None,
    get: Callable[[list], list] | None = None,
    host: str = "127.0.0.1",
) -> WeightTransport:
    """The transport `cfg.transport` names (by its config class), for either end. `put`/`get` are
    the object store's (Ray's), for transports that move bytes through it; `host` is this node's
    address, where a transport that hosts a rendezvous (rank 0's broadcast group) is reached."""
    return TRANSPORTS[type(cfg.transport)](cfg, store, variants, engine_dtype, put, get, host)
