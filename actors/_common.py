"""What every actor does at start: validate its config copy and serve its metrics.

Actor modules reach metric collectors through the `rlhf_cluster.metrics` module, never as
imported globals: Ray pickles actor classes by value, and a collector (it holds a lock) cannot
be pickled.
"""

from __future__ import annotations

import os

from rlhf_cluster.config import JobConfig
from rlhf_cluster.metrics import MetricLabels, serve_metrics


def actor_setup(cfg_dict: dict, pool: str, worker: str) -> tuple[JobConfig, MetricLabels, int | None]:
    """Parse the job config shipped to the actor and start its /metrics endpoint."""
    cfg = JobConfig.model_validate(cfg_dict)
    labels = MetricLabels(job=cfg.name, pool=pool, worker=worker)
    port = serve_metrics(cfg.metrics.bind_address) if cfg.metrics.enabled else None
    return cfg, labels, port


def metrics_target(bind_address: str, port: int | None) -> str | None:
    """`host:port` Prometheus can scrape: the node's IP when bound to all interfaces."""
    if port is None:
        return None
    import ray

    host = ray.util.get_node_ip_address() if bind_address in ("0.0.0.0", "::") else bind_address
    return f"{host}:{port}"


def limit_threads(share: int) -> None:
    """Give this process its share of the node's cores so co-located actors do not thrash."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, share)))
