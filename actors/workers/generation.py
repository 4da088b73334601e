"""GenerationWorker: a vLLM engine in an asyncio Ray actor that loads the weight versions pushed to it.

Calls run concurrently on the actor's event loop; they all feed the one engine, whose loop thread
batches them (`VLLMEngine`). In `streaming` mode each call is one prompt group that returns as
soon as its last response finishes, and a delivery (`load`, pushed by the driver's `WeightSync` when
a version is published; `load_stored` for the store's newest) loads the new weights while requests
are in flight. In `batched` mode one request
runs at a time and weights load only between requests. How a delivery's bytes arrive is the
transport's business (`rlhf_cluster.weights.transports`); this worker knows none of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid

import ray
import torch

from actors.workers._common import metrics_target, start_actor
from actors.workers.settings import GenerationSettings
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.generation.engine import VLLMEngine
from rlhf_cluster.generation.environments import load_environment
from rlhf_cluster.generation.episodes import run_episode
from rlhf_cluster.generation.probe import PROBE_FILE, mismatch, parse_probe_file
from rlhf_cluster.telemetry import metrics as m
from rlhf_cluster.telemetry import tracing
from rlhf_cluster.telemetry.liveness import StallClock
from rlhf_cluster.weights import WeightStore
from rlhf_cluster.weights.messages import Delivery, ProbeReport, Receipt, ReceiptStatus
from rlhf_cluster.weights.registry import engine_transports
from rlhf_cluster.weights.transports import (
    DeliveryInterrupted,
    WeightRefused,
    WeightSuperseded,
    stored_delivery,
)

log = logging.getLogger(__name__)

DELIVERY_WAIT_S = 600  # a request waits this long at most for a pushed version it needs


@ray.remote(concurrency_groups={"health": 1})  # type: ignore[call-overload]  # ray's stubs lack concurrency_groups
class GenerationWorker:
    """Generates rollout groups on one vLLM engine; loads published versions in place."""

    def __init__(self, settings: GenerationSettings, model_path: str, index: int, slot: int | None = None):
        self.name = f"gen{index}"
        self.labels, self.metrics_port = start_actor(settings.basics, "generation", self.name)
        self.generation = gen = settings.generation
        self.metrics_target = metrics_target(settings.basics.metrics.bind_address, self.metrics_port)
        self.store = WeightStore(settings.weights_dir, settings.weights.keep)
        # With int8 rollouts the engine loads the store's int8 variant, derived once per version
        # by the publisher; `model_path` is then the int8 start checkpoint the driver wrote.
        # Per-replica settings follow the slot: a replacement serves what the worker it replaces did.
        self.variant = "int8" if gen.quantization_of(index if slot is None else slot) == "int8" else None
        self.stall = StallClock()  # before the engine: its loop reports every step here
        assert gen.seed is not None  # JobConfig resolves every component seed when it validates
        self.engine = VLLMEngine(
            model_path,
            gen,
            dtype=settings.engine_dtype,
            seed=gen.seed + index,
            name=self.name,
            on_step=self._on_engine_step,
            adapters=settings.adapters,
        )
        self.labels.of(m.GENERATION_VERSION).set(0)
        # Multi-turn: a fresh environment per episode (None: one response per prompt).
        self.environment = load_environment(gen.environment) if gen.environment else None
        # Agent episodes: the user's agent drives each sample through this worker's own gateway.
        self.agents = None
        if gen.agent:
            from rlhf_cluster.gateway.runner import AgentRunner  # FastAPI and uvicorn load only where a gateway serves

            self.agents = AgentRunner(self.engine, gen)
        # Gateway requests, refusals and agent failures already exported.
        self._gateway_seen: tuple[int, dict[str, int], dict[str, int]] = (0, {}, {})
        self.loaded: tuple[int, str] | None = None  # (version, created_at) of the weights in the engine
        self.fingerprint: str | None = None  # of the bytes the engine holds, as its transport proves them
        self.refused: set[tuple[int, str]] = set()
        self.swaps: list[dict] = []  # every in-place weight load, for tests and audits
        self._sync_lock = asyncio.Lock()  # one weight load at a time
        self._one_request = asyncio.Lock()  # batched mode: requests run one after another
        engine_dtype = getattr(torch, settings.engine_dtype)
        # The job's transport, and the store's (its versions reach the engine as deliveries too), by type.
        self.transport, stored = engine_transports(
            settings.weights, self.store, gen.weight_variants, engine_dtype, get=ray.get
        )
        self.transports = {t.type: t for t in (stored, self.transport)}
        self._delivered = asyncio.Condition()  # the engine's version moved (or a delivery was refused)
        # The newest version refused. Requests that need it go on with the version held, as with a
        # refused stored version (the staleness filter judges their samples).
        self.refused_up_to = -1

    def _on_engine_step(self, running: int, waiting: int) -> None:
        """Called by the engine loop after every step with vLLM's scheduler counts."""
        self.labels.of(m.GENERATION_ENGINE_BATCH).observe(running)
        self.labels.of(m.GENERATION_IN_FLIGHT).set(running + waiting)
        self.stall.stepped(running + waiting)

    @ray.method(concurrency_group="health")
    def heartbeat(self) -> dict:
        """Answered on its own thread even while requests run: a stopped process does not answer,
        a hung engine reports how long it has gone without a step."""
        return {"stalled_s": self.stall.stalled_s(), "spans": tracing.drain()}

    def info(self) -> dict:
        return {
            "name": self.name,
            "metrics": self.metrics_target,
            "version": self.engine.version,
            "pid": os.getpid(),
            "variant": self.variant or "full",
            "engine": id(self.engine),
        }

    def engine_stats(self) -> dict:
        """vLLM's batch sizes so far, the version held, requests in flight, the weight loads and the
        speculative-decoding counters."""
        return {
            **self.engine.batches.stats(),
            "version": self.engine.version,
            "in_flight": self.engine.in_flight(),
            "engine": id(self.engine),
            "swaps": list(self.swaps),
            "speculative": self.engine.speculative_stats(),
        }

    async def sync(self, min_version: int = 0) -> int:
        """Load the store's newest version unless the engine holds it already; returns the version
        held (`load_stored`'s receipt, for callers that need only the number)."""
        await self.load_stored(min_version)
        return self.engine.version

    async def load_stored(self, min_version: int = 0) -> Receipt:
        """The store's newest version, as a `filesystem` delivery through `load`: the one load
        path. A stored version refused once (its bytes fail their checksums) is not read again, nor
        one the engine holds (whichever transport brought it); one that retention removes
        meanwhile is passed over for the newer one."""
        while True:
            latest = self.store.latest_version()
            if latest is None or latest < min_version:
                raise RuntimeError(
                    f"{self.name}: version >= {min_version} requested but the store's newest is {latest}"
                )
            try:
                delivery = await asyncio.to_thread(stored_delivery, self.store, latest, [self.variant or "full"])
            except FileNotFoundError:
                continue  # removed by retention after a newer one landed: take that
            if delivery.identity in self.refused:
                return self._receipt(delivery, "refused", reason="refused before")
            if delivery.identity == self.loaded:  # held, proven by the transport that brought it
                return self._receipt(delivery, "held", fingerprint=self.fingerprint)
            receipt = await self.load(delivery)
            if receipt.status != "superseded":
                return receipt

    async def load(self, delivery: Delivery) -> Receipt:
        """Load a delivered version in place at one token boundary, its bytes fetched and checked
        by the delivery's transport first (the job's, or the store's). Requests in flight keep
        running until the engine loop reaches a token boundary, then continue (or restart) with
        the new weights. Returns the receipt: the fingerprint of the bytes loaded (and the probe
        report of the load); a version whose bytes do not match what the sender declared is
        refused and counted, and the engine keeps serving the one it holds."""
        variant = self.variant or "full"
        sent = delivery.link(variant).fingerprint
        transport = self.transports[delivery.transport]
        # Batched mode loads weights only between requests.
        between_requests = self._one_request if self.generation.mode == "batched" else contextlib.nullcontext()
        async with between_requests, self._sync_lock:
            start = time.perf_counter()
            try:
                if delivery.identity == self.loaded and self.fingerprint == sent:  # held already, and proven
                    await asyncio.to_thread(transport.decline, delivery, variant)
                    return self._receipt(delivery, "held", fingerprint=self.fingerprint)
                fetched = await asyncio.to_thread(transport.fetch, delivery, variant, self.name)
            except DeliveryInterrupted as exc:  # a member of the push's group failed: the push goes out again
                log.warning(f"{self.name}: delivery of version {delivery.version} interrupted: {exc}")
                return self._receipt(delivery, "interrupted", reason=str(exc))
            except WeightSuperseded as exc:  # not a fault: a newer version's push is on its way
                return self._receipt(delivery, "superseded", reason=str(exc))
            except WeightRefused as exc:
                return await self._refuse(delivery, exc)
            swap = await asyncio.to_thread(self.engine.load_weights, fetched.version, fetched.tensors)
            nbytes, fingerprint = fetched.nbytes, fetched.fingerprint
            probe = delivery.files.get(PROBE_FILE) or fetched.files.get(PROBE_FILE)  # (a stored version's: on disk)
            del fetched
            self.loaded, self.fingerprint = delivery.identity, fingerprint
            seconds = time.perf_counter() - start
            tracing.add(
                "weights.load", time.time() - seconds, time.time(), version=delivery.version, transport=transport.type
            )
            self._record_swap(delivery.version, swap, seconds, nbytes, transport.type)
        async with self._delivered:
            self._delivered.notify_all()
        report = None
        if probe is not None:
            report = await self._score_probe(delivery, probe, seconds, nbytes)
        return self._receipt(delivery, "loaded", fingerprint=fingerprint, seconds=seconds, nbytes=nbytes, probe=report)

    async def _refuse(self, delivery: Delivery, exc: Exception) -> Receipt:
        """Count and log a refused version; requests that need it go on with the version held."""
        if self.transports[delivery.transport] is self.transport:  # a push's bytes (not the store's)
            self.labels.of(m.WEIGHTS_FINGERPRINT_MISMATCH).inc()
        self.labels.of(m.WEIGHTS_REFUSED).inc()
        self.refused.add(delivery.identity)
        self.refused_up_to = max(self.refused_up_to, delivery.version)
        self.labels.of(m.GENERATION_VERSIONS_BEHIND).set(max(0, delivery.version - self.engine.version))
        log.warning(
            f"{self.name}: refused {delivery.transport} version {delivery.version}: {exc}; keeping version "
            f"{self.engine.version}"
        )
        async with self._delivered:
            self._delivered.notify_all()
        return self._receipt(delivery, "refused", reason=str(exc))

    def _receipt(
        self,
        delivery: Delivery,
        status: ReceiptStatus,
        fingerprint: str | None = None,
        reason: str = "",
        seconds: float = 0.0,
        nbytes: int = 0,
        probe: ProbeReport | None = None,
    ) -> Receipt:
        variant = self.variant or "full"
        return Receipt(
            worker=self.name,
            version=delivery.version,
            variant=variant,
            status=status,
            fingerprint=fingerprint,
            reason=reason,
            held_version=self.engine.version,
            seconds=seconds,
            bytes=nbytes,
            sent_fingerprint=delivery.link(variant).fingerprint,
            probe=probe,
        )

    def corrupt_next_delivery(self, bucket: int) -> None:
        """Test hook: the next delivery's `bucket` arrives with one byte flipped (as if damaged in transit)."""
        self.transport.corrupt_bucket = bucket

    async def _hold(self, min_version: int) -> None:
        """Until the engine holds a version >= `min_version` (pushed by the driver, or refused),
        waiting at most `DELIVERY_WAIT_S`."""
        async with self._delivered:
            try:
                await asyncio.wait_for(
                    self._delivered.wait_for(lambda: max(self.engine.version, self.refused_up_to) >= min_version),
                    DELIVERY_WAIT_S,
                )
            except TimeoutError:
                raise TimeoutError(
                    f"{self.name}: no delivery of version >= {min_version} within {DELIVERY_WAIT_S} s "
                    f"(the engine holds {self.engine.version})"
                ) from None

    def _record_swap(self, version: int, swap, seconds: float, nbytes: int, transport: str) -> None:
        self.labels.of(m.WEIGHTS_SYNC_SECONDS).observe(seconds)
        self.labels.of(m.WEIGHTS_SYNC_BYTES).inc(nbytes)
        self.labels.of(m.WEIGHTS_DELIVERY_SECONDS, transport=transport).observe(seconds)
        self.labels.of(m.WEIGHTS_DELIVERY_BYTES, transport=transport).inc(nbytes)
        self.labels.of(m.GENERATION_VERSION).set(version)
        self.labels.of(m.GENERATION_VERSIONS_BEHIND).set(0)  # it holds the newest it was given
        self.labels.of(m.GENERATION_PAUSE_SECONDS).observe(swap.paused_seconds)
        self.labels.of(m.GENERATION_VERSION_TOKENS).observe(swap.tokens_of_previous)
        self.labels.of(m.GENERATION_RESUMED).inc(swap.resumed)
        self.labels.of(m.GENERATION_ABORTED).inc(swap.aborted)
        self.swaps.append(
            {
                "version": version,
                "paused_seconds": swap.paused_seconds,
                "resumed": swap.resumed,
                "aborted": swap.aborted,
                "tokens_of_previous": swap.tokens_of_previous,
                "seconds": seconds,
                "bytes": nbytes,
                "transport": transport,
            }
        )

    async def _score_probe(self, delivery: Delivery, text: str, seconds: float, nbytes: int) -> ProbeReport:
        """Score the version's probe with the engine and compare with the learner's log-probs."""
        probe, learner_logprobs = parse_probe_file(text)
        engine_logprobs = await asyncio.to_thread(self.engine.logprobs_of_many, probe.prompt_ids, probe.response_ids)
        report = ProbeReport(
            worker=self.name,
            pid=os.getpid(),
            version=delivery.version,
            variant=self.variant or "full",
            created_at=delivery.created_at,
            sync_seconds=seconds,
            sync_bytes=nbytes,
            mismatch=mismatch(learner_logprobs, engine_logprobs),
        )
        self.labels.of(m.PROBE_MISMATCH_K3).set(report.k3)
        self.labels.of(m.PROBE_MAX_DIFF).set(report.max_abs_diff)
        return report

    async def _groups(self, prompts: list[Prompt], n: int | None = None, greedy: bool = False) -> list[Rollout]:
        if self.agents is not None:
            return await self._agent_episodes(prompts, n, greedy)
        if self.environment is not None:
            return await self._episodes(prompts, n, greedy)
        futures = [asyncio.wrap_future(self.engine.submit_group(p, n, greedy)) for p in prompts]
        rollouts = [r for group in await asyncio.gather(*futures) for r in group]
        self.labels.of(m.GENERATION_TOKENS).inc(sum(len(r.response_ids) for r in rollouts))
        return rollouts

    async def _per_sample(self, prompts: list[Prompt], n: int | None, greedy: bool, start) -> list:
        """`start(prompt, group_id, sample_id)` for each of the `n` samples of every prompt (one
        greedy), all at once; their results in order."""
        count = 1 if greedy else n or self.generation.sampling.n
        jobs = []
        for p in prompts:
            group_id = f"{p.prompt_id}:{uuid.uuid4().hex[:12]}"
            jobs += [start(p, group_id, f"{group_id}:{k}") for k in range(count)]
        return await asyncio.gather(*jobs)

    async def _episodes(self, prompts: list[Prompt], n: int | None, greedy: bool) -> list[Rollout]:
        """Multi-turn: `n` episodes per prompt (one greedy), all at once, each with its own environment."""
        environment = self.environment
        assert environment is not None  # `_groups` runs episodes only with an environment
        done = await self._per_sample(
            prompts,
            n,
            greedy,
            lambda p, group_id, sample_id: run_episode(
                self.engine, self.generation, p, environment(), sample_id, group_id, greedy
            ),
        )
        for _rollout, stats in done:
            self.labels.of(m.EPISODE_TURNS).observe(stats.turns)
            self.labels.of(m.TOOL_CALLS).inc(stats.tool_calls)
            for tool, errors in stats.tool_errors.items():
                self.labels.of(m.TOOL_ERRORS, tool=tool).inc(errors)
            self.labels.of(m.ENVIRONMENT_SECONDS).inc(stats.environment_seconds)
        rollouts = [r for r, _ in done]
        self.labels.of(m.GENERATION_TOKENS).inc(sum(sum(r.loss_mask) for r in rollouts))
        return rollouts

    async def _agent_episodes(self, prompts: list[Prompt], n: int | None, greedy: bool) -> list[Rollout]:
        """Agent episodes: `n` calls of the user's agent per prompt (one greedy), all at once."""
        agents = self.agents
        assert agents is not None  # `_groups` runs agent episodes only with an agent runner
        done = await self._per_sample(
            prompts, n, greedy, lambda p, group_id, sample_id: agents.episode(p, group_id, sample_id, greedy)
        )
        stats = agents.gateway.stats
        seen_requests, seen_refused, seen_failed = self._gateway_seen
        self.labels.of(m.GATEWAY_REQUESTS).inc(stats.requests - seen_requests)
        for status, refused in stats.refused.items():
            self.labels.of(m.GATEWAY_REFUSED, status=status).inc(refused - seen_refused.get(status, 0))
        for kind, failed in agents.failures.items():
            self.labels.of(m.AGENT_FAILURES, kind=kind).inc(failed - seen_failed.get(kind, 0))
        self._gateway_seen = (stats.requests, dict(stats.refused), dict(agents.failures))
        for episode, rewrites in done:
            self.labels.of(m.EPISODE_TURNS).observe(
                len(episode) if episode[0].episode_id else len(episode[0].turn_starts or [])
            )
            self.labels.of(m.GATEWAY_HISTORY_REWRITES).inc(rewrites)
        rollouts = [r for episode, _ in done for r in episode]
        self.labels.of(m.GENERATION_TOKENS).inc(sum(sum(r.loss_mask) for r in rollouts))
        return rollouts

    async def generate_group(self, prompt: Prompt, min_version: int) -> list[Rollout]:
        """Streaming: the `n` rollouts of one prompt, started at once with weights of version >=
        `min_version`; returns when its last response finishes (other calls keep decoding)."""
        # The driver pushes every version (a rollback's too) before it is needed. Every load's
        # probe report goes back on the load's receipt.
        await self._hold(min_version)
        with tracing.span("generate", prompt=prompt.prompt_id):
            return await self._groups([prompt])

    async def generate(self, prompts: list[Prompt], min_version: int) -> list[Rollout]:
        """Batched: `n` rollouts per prompt with weights of version >= `min_version`, returned
        together when the slowest finishes."""
        await self._hold(min_version)  # outside the request lock: the delivery it waits for takes that lock
        async with self._one_request:
            with tracing.span("generate", prompts=len(prompts)):
                return await self._groups(prompts)

    async def evaluate(self, prompts: list[Prompt], min_version: int, samples: int = 0) -> list[Rollout]:
        """Held-out evaluation with weights of version >= `min_version`: one greedy response per
        prompt, or with `samples` > 0 that many sampled ones (training sampling settings)."""
        await self._hold(min_version)
        return await self._groups(prompts, n=samples or None, greedy=samples == 0)

    def refused_versions(self) -> list[int]:
        return sorted(v for v, _ in self.refused)

    async def logprobs_of(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        return await asyncio.to_thread(self.engine.logprobs_of, prompt_ids, response_ids)
