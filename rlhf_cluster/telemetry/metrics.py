"""Metric names (`rlhf_<component>_<what>_<unit>`) and Prometheus collectors.

Every process (actor or driver) creates the collectors of its component once, bound to its
`job`, `pool` and `worker` labels, and serves them on its own `/metrics` endpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram, start_http_server

LABELS = ("job", "pool", "worker")


def _counter(name: str, documentation: str, *labels: str) -> Counter:
    """A counter under the process's labels (`LABELS`) and any `labels` of its own."""
    return Counter(name, documentation, LABELS + labels)


def _gauge(name: str, documentation: str, *labels: str) -> Gauge:
    """A gauge under the process's labels (`LABELS`) and any `labels` of its own."""
    return Gauge(name, documentation, LABELS + labels)


def _histogram(
    name: str, documentation: str, *labels: str, buckets: Sequence[float] = Histogram.DEFAULT_BUCKETS
) -> Histogram:
    """A histogram under the process's labels (`LABELS`) and any `labels` of its own."""
    return Histogram(name, documentation, LABELS + labels, buckets=buckets)


def _step_gauges(table: dict[str, tuple[str, str]]) -> dict[str, Gauge]:
    """Gauges a step's row alone sets: column -> a gauge declared from its (name, documentation)."""
    return {column: _gauge(name, documentation) for column, (name, documentation) in table.items()}


# Seconds a fault takes to see and to mend: from a second to five minutes.
_RECOVERY_BUCKETS = (1, 2, 5, 10, 15, 20, 30, 60, 120, 300)

GENERATION_TOKENS = _counter("rlhf_generation_tokens_total", "Response tokens generated.")
GENERATION_IN_FLIGHT = _gauge(
    "rlhf_generation_requests_in_flight", "Responses in the worker's engine (running + waiting)."
)
GENERATION_ENGINE_BATCH = _histogram(
    "rlhf_generation_engine_batch_size",
    "Sequences vLLM decoded together in one engine step.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
GENERATION_PAUSE_SECONDS = _histogram(
    "rlhf_generation_weight_pause_seconds",
    "Time the engine stood still for an in-place weight load.",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10),
)
GENERATION_VERSION_TOKENS = _histogram(
    "rlhf_generation_version_tokens",
    "Tokens a worker sampled with one weight version (observed when it is replaced).",
    buckets=(0, 64, 256, 1024, 4096, 16384, 65536, 262144),
)
GENERATION_RESUMED = _counter(
    "rlhf_generation_resumed_requests_total", "Unfinished responses that continued with newly loaded weights."
)
GENERATION_ABORTED = _counter(
    "rlhf_generation_aborted_requests_total",
    "Unfinished responses restarted after a weight load (in_flight_update: abort).",
)
GENERATION_VERSION = _gauge("rlhf_generation_weight_version", "Weight version the engine holds.")
WEIGHTS_SYNC_SECONDS = _histogram("rlhf_weights_sync_seconds", "Time to load a weight version into a worker.")
WEIGHTS_REFUSED = _counter("rlhf_weights_refused_total", "Weight versions refused because their checksums failed.")
WEIGHTS_SYNC_BYTES = _counter("rlhf_weights_sync_bytes_total", "Weight bytes loaded into workers.")
# Direct transport: per worker and transport, what each delivered version cost and whether it was proven.
WEIGHTS_DELIVERY_SECONDS = _histogram(
    "rlhf_weights_delivery_seconds",
    "Time from a version's delivery call to the engine holding it (fetch, verify, load).",
    "transport",
)
WEIGHTS_DELIVERY_BYTES = _counter(
    "rlhf_weights_delivery_bytes_total", "Engine-dtype weight bytes delivered.", "transport"
)
WEIGHTS_FINGERPRINT_MISMATCH = _counter(
    "rlhf_weights_fingerprint_mismatches_total",
    "Delivered versions refused: a bucket or the fingerprint did not match the sender's.",
)
GENERATION_VERSIONS_BEHIND = _gauge(
    "rlhf_generation_versions_behind", "Versions between the newest delivered one and the one this engine holds."
)
SCORING_SAMPLES = _counter("rlhf_scoring_samples_total", "Responses scored.")
SCORING_TOKENS = _counter(
    "rlhf_scoring_reference_tokens_total", "Response tokens the reference (or teacher) workers scored."
)
SCORING_SECONDS = _counter(
    "rlhf_scoring_reference_seconds_total",
    "Seconds the reference (or teacher) forwards took: tokens_total / seconds_total is their throughput.",
)
SCORING_JUDGE_VERDICTS = _counter(
    "rlhf_scoring_judge_verdicts_total",
    "Judge replies by outcome: parsed, unparseable (no verdict its parser reads) or error (the call failed); the "
    "last two drop their samples.",
    "outcome",
)
LEARNER_STEP_SECONDS = _histogram("rlhf_learner_step_seconds", "Learner train-step time.")
LEARNER_TOKENS = _counter("rlhf_learner_tokens_total", "Response tokens trained on.")
BUFFER_DEPTH = _gauge("rlhf_buffer_depth", "Samples waiting in the experience buffer.")
BUFFER_DROPPED = _counter("rlhf_buffer_samples_dropped_total", "Samples dropped, by reason.", "reason")
STALENESS = _histogram(
    "rlhf_staleness_steps",
    "Learner version minus sample policy version at consumption.",
    buckets=(0, 1, 2, 3, 4, 8, 16),
)
# Set by each generation worker after a weight sync (generation.probe); the driver counts jumps.
PROBE_MISMATCH_K3 = _gauge(
    "rlhf_generation_probe_mismatch_k3", "k3 of engine vs learner log-probs on the probe, newest version."
)
PROBE_MAX_DIFF = _gauge(
    "rlhf_generation_probe_logprob_diff_max", "Largest |engine - learner| log-prob on the probe, newest version."
)
MISMATCH_ALERTS = _counter(
    "rlhf_generation_mismatch_alerts_total", "Versions whose probe mismatch jumped (generation.probe)."
)
WEIGHTS_VARIANT_SECONDS = _histogram(
    "rlhf_weights_variant_seconds",
    "Time to derive and write a weight variant (e.g. int8), once per version.",
    "variant",
)
WEIGHTS_PUBLISHED_BYTES = _counter(
    "rlhf_weights_published_bytes_total",
    "Bytes of weight versions this learner rank packed and sent (rank 0 all, or each rank its share).",
)
BAD_STEPS = _counter("rlhf_learner_bad_steps_total", "Steps whose update was skipped for a NaN/inf loss or gradient.")
CHECKPOINT_FAILURES = _counter("rlhf_checkpoint_failures_total", "Checkpoints that could not be written.")
LEARNER_VERSION = _gauge("rlhf_learner_weight_version", "Newest published weight version.")
REFERENCE_REFRESH_SECONDS = _histogram(
    "rlhf_reference_refresh_seconds",
    "A KL reference refresh's folder write, from its version durable to the folder in place (the driver's).",
    buckets=_RECOVERY_BUCKETS,
)
REFERENCE_VERSION = _gauge(
    "rlhf_reference_weight_version",
    "Weight version the KL reference worker scores with (algorithm.kl.reference_refresh; 0: the starting model).",
)
LEARNER_RANKS = _gauge(
    "rlhf_learner_world_size", "Learner ranks training now (fewer than configured after an elastic shrink)."
)
# Counted when a pool replaces a dead worker, under the dead worker's name (deploy/alerts.yml: RlhfWorkerRestarted).
RESTARTS = _counter("rlhf_pool_worker_restarts_total", "Workers restarted after a failure.")
# Set by the driver's autoscaler (actors/workers/autoscaling.py), under worker="driver".
AUTOSCALER_DECISIONS = _counter(
    "rlhf_autoscaler_decisions_total", "Pool resizes the autoscaler applied, by direction (up, down).", "direction"
)
POOL_TARGET_REPLICAS = _gauge(
    "rlhf_pool_target_replicas", "Workers a pool is sized to (its start, the autoscaler's or a manual scale)."
)
POOL_SPARES = _gauge("rlhf_pool_spares", "A pool's warm spares ready now (started, loaded, out of rotation).")
HUNG_DETECTION_SECONDS = _histogram(
    "rlhf_fault_detection_seconds", "From a hung worker's last good heartbeat to its kill.", buckets=_RECOVERY_BUCKETS
)
WORKER_REPLACEMENT_SECONDS = _histogram(
    "rlhf_worker_replacement_seconds",
    "From killing a hung worker to its replacement serving (weights loaded).",
    buckets=_RECOVERY_BUCKETS,
)
# Set by the driver per consumed batch (deploy/alerts.yml: RlhfStalenessAboveBound compares it with
# STEP_GAUGES' staleness_max).
STALENESS_BOUND = _gauge("rlhf_staleness_bound_steps", "Configured max_staleness (train.max_staleness).")

# The step's rollouts (rlhf_cluster/telemetry/rollout_stats.py): length runaway, truncation, reward spread, diversity.
EVAL_ACCURACY = _gauge(
    "rlhf_eval_accuracy",
    "Held-out accuracy at the last periodic evaluation (the reward's correct or acc component), greedy "
    "or sampled (mean over data.eval_samples answers per prompt).",
    "mode",
)
EVAL_SOURCE_ACCURACY = _gauge(
    "rlhf_eval_source_accuracy",
    "Held-out greedy accuracy at the last periodic evaluation within one source of the prompts (data.columns.source).",
    "source",
)
GUARDRAIL_ACTIONS = _counter(
    "rlhf_guardrail_actions_total",
    "Actions the guardrails took on the periodic evaluation: "
    "best (a best-so-far checkpoint kept), stop (an early stop), rollback (to the last good checkpoint).",
    "action",
)
EVAL_PASS_AT_K = _gauge(
    "rlhf_eval_pass_at_k", "Held-out pass@k at the last periodic evaluation (unbiased estimator).", "k"
)
EPISODE_TURNS = _histogram(
    "rlhf_generation_episode_turns", "Model turns per multi-turn episode.", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32)
)
TOOL_CALLS = _counter("rlhf_generation_tool_calls_total", "Tool calls the policy made in multi-turn episodes.")
TOOL_ERRORS = _counter("rlhf_generation_tool_errors_total", "Tool calls that came back as errors, by tool.", "tool")
GATEWAY_REQUESTS = _counter("rlhf_gateway_requests_total", "Calls the agent gateway answered (chat and completions).")
GATEWAY_REFUSED = _counter("rlhf_gateway_refused_total", "Calls the agent gateway refused, by HTTP status.", "status")
AGENT_FAILURES = _counter(
    "rlhf_gateway_agent_failures_total",
    "Agent calls that failed, their samples dropped, by kind: timeout, raised, died (its process ended), bad_result.",
    "kind",
)
GATEWAY_HISTORY_REWRITES = _counter(
    "rlhf_gateway_history_rewrites_total",
    "Agent calls whose earlier messages differed from what the model saw (e.g. a "
    "stripped <think> block); the engine's own tokens were kept.",
)
TINKER_REQUESTS = _counter(
    "rlhf_tinker_requests_total", "Calls the Tinker server answered, by route and status.", "route", "status"
)
TINKER_FUTURES = _gauge("rlhf_tinker_futures_in_flight", "Tinker futures not finished yet, by kind.", "kind")
TINKER_TOKENS_TRAINED = _counter(
    "rlhf_tinker_tokens_trained_total", "Tokens a Tinker training client's forward_backward calls trained on.", "client"
)
TINKER_TOKENS_SAMPLED = _counter(
    "rlhf_tinker_tokens_sampled_total",
    "Tokens sampled for a Tinker sampler (a sampler id, a saved path or the base).",
    "client",
)
TINKER_CLIENTS = _gauge("rlhf_tinker_training_clients", "Tinker training clients holding an adapter slot.")
ENVIRONMENT_SECONDS = _counter("rlhf_generation_environment_seconds_total", "Time environments took to answer turns.")
# The pools a step's row may report a busy share of (`busy_<pool>`): every pool a job can run.
BUSY_POOLS = ("generation", "reward", "reference", "teacher", "judge")
POOL_BUSY = _gauge(
    "rlhf_step_pool_busy_ratio",
    "Share of the last step a pool's workers had a request from the driver in flight (mean over the pool's workers).",
    "busy_pool",
)
POOL_QUEUE = _gauge(
    "rlhf_step_pool_queue_samples",
    "Mean samples that waited for a free worker of a scoring pool over the last step (its queue depth).",
    "queue_pool",
)
RESPONSE_LENGTH = _gauge(
    "rlhf_train_response_length_tokens", "Response length of the last consumed batch, by statistic.", "stat"
)
REWARD_SPREAD = _gauge("rlhf_train_reward", "Reward of the last consumed batch, by statistic (min, max, std).", "stat")
DISTINCT = _gauge(
    "rlhf_train_distinct_ngrams_ratio", "Distinct n-grams / n-grams over the last consumed batch's responses.", "n"
)


# The one table from a step's row (metrics.jsonl column) to the driver's Prometheus gauge: every
# step sets each gauge whose column is in the row. Components return metrics dicts; only this
# table decides what Prometheus shows of them. A gauge nothing else sets is declared in its row.
STEP_GAUGES = {
    "buffer_depth": BUFFER_DEPTH,
    **_step_gauges(
        {
            "kl": ("rlhf_train_kl", "KL to the reference (per token)."),
            "reward_mean": ("rlhf_train_reward_mean", "Mean reward of the step's batch."),
            "policy/entropy": ("rlhf_train_entropy", "Mean token entropy."),
            "policy/clip_frac": ("rlhf_train_clip_fraction", "Fraction of tokens clipped by PPO."),
            "multi_version_fraction": (
                "rlhf_train_multi_version_fraction",
                "Share of the last consumed batch's samples sampled by more than one weight version.",
            ),
            "staleness_max": ("rlhf_staleness_max_steps", "Largest staleness in the last consumed batch."),
            # The step's learner-vs-rollout mismatch (delta = log pi_prox - log pi_roll over the batch's tokens).
            "correction/ess": ("rlhf_correction_ess", "Effective sample size of the importance weights."),
            "correction/mismatch_k1": (
                "rlhf_correction_mismatch_k1",
                "k1 mismatch KL(pi_roll || pi_prox) of the step's batch.",
            ),
            "correction/mismatch_k3": (
                "rlhf_correction_mismatch_k3",
                "k3 mismatch KL(pi_roll || pi_prox) of the step's batch.",
            ),
            "correction/frac_truncated": ("rlhf_correction_truncated_fraction", "Tokens whose TIS weight hit the cap."),
            "correction/frac_truncated_low": (
                "rlhf_correction_truncated_low_fraction",
                "Tokens whose TIS weight was raised to algorithm.correction.lower.",
            ),
            "correction/frac_masked": (
                "rlhf_correction_masked_fraction",
                "Tokens (or sequences) MIS removed from the loss.",
            ),
            # PPO with a critic (algorithm.advantage: gae): the critic's step on the consumed batch.
            "critic/value_loss": (
                "rlhf_critic_value_loss",
                "Clipped value loss of the critic's last step (token mean).",
            ),
            "critic/explained_variance": (
                "rlhf_critic_explained_variance_ratio",
                "1 - Var(returns - values) / Var(returns) of the last consumed batch.",
            ),
            "critic/value_clip_frac": (
                "rlhf_critic_value_clip_fraction",
                "Tokens whose clipped value term won in the critic's last step.",
            ),
            "truncated_fraction": (
                "rlhf_train_truncated_fraction",
                "Share of the last consumed batch's responses cut at max_new_tokens.",
            ),
            "unique_per_group": (
                "rlhf_train_unique_responses_per_group_ratio",
                "Mean share of distinct responses within a group (1/n: mode collapse).",
            ),
            "learner_wait_seconds": (
                "rlhf_step_learner_wait_seconds",
                "Time the last step waited for its batch (the learner idle for data).",
            ),
            "eval_reward_mean": (
                "rlhf_eval_reward_mean",
                "Held-out mean reward of the greedy answers at the last periodic evaluation.",
            ),
            "eval_sampled_reward_mean": (
                "rlhf_eval_sampled_reward_mean",
                "Held-out mean reward of data.eval_samples sampled answers per prompt at the last periodic evaluation.",
            ),
            # Mixture-of-experts policies (`learner.routing`): the step's routing probe on its first micro-batch.
            "routing/expert_set_agreement": (
                "rlhf_routing_expert_set_agreement_ratio",
                "Share of (token, MoE layer) pairs the learner routes to the engine's expert set, routing itself.",
            ),
            "routing/load_max_over_mean": (
                "rlhf_routing_load_max_over_mean_ratio",
                "Max over mean tokens per expert of the engine's routing (1: even).",
            ),
            "routing/mismatch_k3_with_replay": (
                "rlhf_routing_mismatch_k3_with_replay",
                "k3 of learner vs rollout log-probs on the step's probe, replayed.",
            ),
            "routing/mismatch_k3_without_replay": (
                "rlhf_routing_mismatch_k3_without_replay",
                "k3 of learner vs rollout log-probs on the step's probe, own routing.",
            ),
        }
    ),
}
# Columns that are one labelled series of a gauge: column -> (gauge, extra labels).
STEP_LABELLED_GAUGES = {
    "response_len_mean": (RESPONSE_LENGTH, {"stat": "mean"}),
    "response_len_p50": (RESPONSE_LENGTH, {"stat": "p50"}),
    "response_len_p90": (RESPONSE_LENGTH, {"stat": "p90"}),
    "response_len_max": (RESPONSE_LENGTH, {"stat": "max"}),
    "reward_min": (REWARD_SPREAD, {"stat": "min"}),
    "reward_max": (REWARD_SPREAD, {"stat": "max"}),
    "reward_std": (REWARD_SPREAD, {"stat": "std"}),
    "distinct_1": (DISTINCT, {"n": "1"}),
    "distinct_2": (DISTINCT, {"n": "2"}),
    "distinct_3": (DISTINCT, {"n": "3"}),
    **{f"busy_{pool}": (POOL_BUSY, {"busy_pool": pool}) for pool in BUSY_POOLS},
    **{f"queue_{pool}": (POOL_QUEUE, {"queue_pool": pool}) for pool in BUSY_POOLS},
    "eval_accuracy": (EVAL_ACCURACY, {"mode": "greedy"}),
    "eval_sampled_accuracy": (EVAL_ACCURACY, {"mode": "sampled"}),
}
# Columns named by a prefix and one label value: prefix -> (gauge, the label the rest fills).
STEP_PREFIXED_GAUGES = {"eval_pass@": (EVAL_PASS_AT_K, "k"), "eval_accuracy/": (EVAL_SOURCE_ACCURACY, "source")}


@dataclass(frozen=True)
class MetricLabels:
    """The label values one process reports under."""

    job: str
    pool: str
    worker: str

    def of(self, metric, **extra):
        return metric.labels(job=self.job, pool=self.pool, worker=self.worker, **extra)


def serve_metrics(bind_address: str = "127.0.0.1", port: int = 0, port_range: tuple[int, int] | None = None) -> int:
    """Serve this process's `/metrics`; returns the bound port (0 picks a free one; with
    `port_range`, the first free port of [first, last])."""
    if port_range is None:
        server, _thread = start_http_server(port, addr=bind_address)
        return server.server_port
    for candidate in range(port_range[0], port_range[1] + 1):
        try:
            server, _thread = start_http_server(candidate, addr=bind_address)
        except OSError:
            continue  # taken by another actor on this node
        return server.server_port
    raise RuntimeError(
        f"metrics.port_range {list(port_range)}: every port is taken on this node; widen the range "
        "(one port per actor on a node, plus the driver's)"
    )
