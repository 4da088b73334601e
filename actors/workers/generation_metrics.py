"""A generation worker's figures, as its metrics: its weight loads (the `ReceiverMetrics` its
`WeightReceiver` reports to), and what its multi-turn episodes and agent runs did.

Metric collectors are reached through the `metrics` module at call time (see `_common`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.generation.episodes import EpisodeStats
from rlhf_cluster.generation.receiver import ReceiverMetrics, Swap
from rlhf_cluster.telemetry import metrics as m
from rlhf_cluster.telemetry import tracing
from rlhf_cluster.telemetry.metrics import MetricLabels
from rlhf_cluster.weights.messages import ProbeReport

if TYPE_CHECKING:
    from rlhf_cluster.gateway.runner import AgentRunner


class WeightLoadMetrics(ReceiverMetrics):
    """`ReceiverMetrics` for one worker: sync and delivery figures, the version it serves, what a
    swap did to the requests in flight, refusals and fingerprint mismatches, the probe's scores;
    each load is a `weights.load` span of the trace too."""

    def __init__(self, labels: MetricLabels):
        self.labels = labels

    def loaded(self, swap: Swap) -> None:
        now = time.time()
        tracing.add("weights.load", now - swap.seconds, now, version=swap.version, transport=swap.transport)
        of = self.labels.of
        of(m.WEIGHTS_SYNC_SECONDS).observe(swap.seconds)
        of(m.WEIGHTS_SYNC_BYTES).inc(swap.bytes)
        of(m.WEIGHTS_DELIVERY_SECONDS, transport=swap.transport).observe(swap.seconds)
        of(m.WEIGHTS_DELIVERY_BYTES, transport=swap.transport).inc(swap.bytes)
        of(m.GENERATION_VERSION).set(swap.version)
        of(m.GENERATION_VERSIONS_BEHIND).set(0)  # it holds the newest it was given
        of(m.GENERATION_PAUSE_SECONDS).observe(swap.paused_seconds)
        of(m.GENERATION_VERSION_TOKENS).observe(swap.tokens_of_previous)
        of(m.GENERATION_RESUMED).inc(swap.resumed)
        of(m.GENERATION_ABORTED).inc(swap.aborted)

    def refused(self, versions_behind: int) -> None:
        self.labels.of(m.WEIGHTS_REFUSED).inc()
        self.labels.of(m.GENERATION_VERSIONS_BEHIND).set(versions_behind)

    def mismatched(self) -> None:
        self.labels.of(m.WEIGHTS_FINGERPRINT_MISMATCH).inc()

    def probed(self, report: ProbeReport) -> None:
        self.labels.of(m.PROBE_MISMATCH_K3).set(report.mismatch.k3)
        self.labels.of(m.PROBE_MAX_DIFF).set(report.mismatch.max_abs_diff)


def count_tokens(labels: MetricLabels, rollouts: Sequence[Rollout], trained_only: bool = False) -> None:
    """Tokens generated (`trained_only`: the model's own, by the loss mask, in multi-turn rollouts)."""
    tokens = sum(len(r.response_ids) if not trained_only or r.loss_mask is None else sum(r.loss_mask) for r in rollouts)
    labels.of(m.GENERATION_TOKENS).inc(tokens)


def count_episodes(labels: MetricLabels, done: Sequence[tuple[Rollout, EpisodeStats]]) -> list[Rollout]:
    """Multi-turn episodes' turns, tool calls and errors, and environment time; their rollouts."""
    for _rollout, stats in done:
        labels.of(m.EPISODE_TURNS).observe(stats.turns)
        labels.of(m.TOOL_CALLS).inc(stats.tool_calls)
        for tool, errors in stats.tool_errors.items():
            labels.of(m.TOOL_ERRORS, tool=tool).inc(errors)
        labels.of(m.ENVIRONMENT_SECONDS).inc(stats.environment_seconds)
    rollouts = [r for r, _ in done]
    count_tokens(labels, rollouts, trained_only=True)
    return rollouts


class AgentCounters:
    """Agent episodes' figures: the gateway's requests and refusals and the agents' failures
    (running totals, exported as they grow), and each episode's turns and history rewrites."""

    def __init__(self, labels: MetricLabels):
        self.labels = labels
        self._seen: tuple[int, dict[str, int], dict[str, int]] = (0, {}, {})  # already exported

    def count(self, agents: AgentRunner, done: Sequence[tuple[list[Rollout], int]]) -> list[Rollout]:
        """Export what `agents` did since the last call and the episodes `done`; their rollouts."""
        labels, stats = self.labels, agents.gateway.stats
        seen_requests, seen_refused, seen_failed = self._seen
        labels.of(m.GATEWAY_REQUESTS).inc(stats.requests - seen_requests)
        for status, refused in stats.refused.items():
            labels.of(m.GATEWAY_REFUSED, status=status).inc(refused - seen_refused.get(status, 0))
        for kind, failed in agents.failures.items():
            labels.of(m.AGENT_FAILURES, kind=kind).inc(failed - seen_failed.get(kind, 0))
        self._seen = (stats.requests, dict(stats.refused), dict(agents.failures))
        for episode, rewrites in done:
            labels.of(m.EPISODE_TURNS).observe(
                len(episode) if episode[0].episode_id else len(episode[0].turn_starts or [])
            )
            labels.of(m.GATEWAY_HISTORY_REWRITES).inc(rewrites)
        rollouts = [r for episode, _ in done for r in episode]
        count_tokens(labels, rollouts, trained_only=True)
        return rollouts
