"""Which transport class serves each `weights.transport` config type, and building one."""

from __future__ import annotations

from rlhf_cluster.config import CollectiveTransport, DirectTransport, FilesystemTransport, WeightsConfig
from rlhf_cluster.weights.collective import BroadcastGroupTransport
from rlhf_cluster.weights.transports import ObjectStoreTransport, StoreTransport, WeightTransport

TRANSPORTS: dict[type, type[WeightTransport]] = {
    FilesystemTransport: StoreTransport,
    DirectTransport: ObjectStoreTransport,
    CollectiveTransport: BroadcastGroupTransport,
}


def build_transport(cfg: WeightsConfig, *args, **kwargs) -> WeightTransport:
    """The transport `cfg.transport` names (by its config class), for either end; the other
    arguments are `WeightTransport`'s (the store, the engine variants and dtype, the object
    store's `put`/`get` for transports that move bytes through it, and this node's `host`, where
    a sender that hosts a rendezvous is reached)."""
    return TRANSPORTS[type(cfg.transport)](cfg, *args, **kwargs)


def engine_transports(cfg: WeightsConfig, *args, **kwargs) -> tuple[WeightTransport, WeightTransport]:
    """An engine's two transports: the job's, and the store's (`filesystem`, the same one for a
    filesystem job), through which every engine also loads the store's newest version
    (`stored_delivery`); arguments as `build_transport`'s."""
    job = build_transport(cfg, *args, **kwargs)
    return job, job if isinstance(job, StoreTransport) else StoreTransport(cfg, *args, **kwargs)
