"""The Tinker server's Prometheus series (`rlhf_tinker_*`, named in `telemetry.metrics`): calls by
route and status, futures in flight, tokens trained and sampled per client, clients held."""

from __future__ import annotations

from rlhf_cluster.telemetry.metrics import (
    TINKER_CLIENTS,
    TINKER_FUTURES,
    TINKER_REQUESTS,
    TINKER_TOKENS_SAMPLED,
    TINKER_TOKENS_TRAINED,
    MetricLabels,
)


class TinkerStats:
    def __init__(self, labels: MetricLabels | None = None):
        self.labels = labels or MetricLabels("tinker", "tinker", "server")

    def request(self, route: str, status: int) -> None:
        self.labels.of(TINKER_REQUESTS, route=route, status=str(status)).inc()

    def future_change(self, kind: str, delta: int) -> None:
        self.labels.of(TINKER_FUTURES, kind=kind).inc(delta)

    def trained(self, client: str, tokens: int) -> None:
        self.labels.of(TINKER_TOKENS_TRAINED, client=client).inc(tokens)

    def sampled(self, client: str, tokens: int) -> None:
        self.labels.of(TINKER_TOKENS_SAMPLED, client=client).inc(tokens)

    def clients(self, held: int) -> None:
        self.labels.of(TINKER_CLIENTS).set(held)
