"""GenerationWorker: a vLLM engine in an asyncio Ray actor that loads the weight versions pushed to it.

Calls run concurrently on the actor's event loop; they all feed the one engine, whose loop thread
batches them (`VLLMEngine`). In `streaming` mode each call is one prompt group that returns as
soon as its last response finishes, and a delivery (`load`, pushed by the driver's `WeightSync` when
a version is published; `load_stored` for the store's newest) loads the new weights while requests
are in flight. In `batched` mode one request runs at a time and weights load only between
requests. The engine's weight state and every load are its `WeightReceiver`'s
(`rlhf_cluster.generation.receiver`); how a delivery's bytes arrive is the transport's business
(`rlhf_cluster.weights.transports`); this worker knows none of them.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import asdict

import ray
import torch

from actors.workers._common import Worker
from actors.workers.generation_metrics import AgentCounters, WeightLoadMetrics, count_episodes, count_tokens
from actors.workers.settings import GenerationSettings
from rlhf_cluster.config import SamplingConfig
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.generation.engine import VLLMEngine
from rlhf_cluster.generation.environments import load_environment
from rlhf_cluster.generation.episodes import run_episode
from rlhf_cluster.generation.multimodal import fail_sampled_placeholders, placeholder_ids
from rlhf_cluster.generation.receiver import WeightReceiver
from rlhf_cluster.telemetry import metrics as m
from rlhf_cluster.telemetry import tracing
from rlhf_cluster.weights import WeightStore
from rlhf_cluster.weights.messages import Delivery, Receipt
from rlhf_cluster.weights.registry import engine_transports


@ray.remote(concurrency_groups={"health": 1})  # type: ignore[call-overload]  # ray's stubs lack concurrency_groups
class GenerationWorker(Worker):
    """Generates rollout groups on one vLLM engine; loads published versions in place."""

    def __init__(self, settings: GenerationSettings, model_path: str, index: int, slot: int | None = None):
        super().__init__(settings.basics, "generation", f"gen{index}")  # its stall clock before the engine
        self.generation = gen = settings.generation
        self.eval_sampling = settings.eval_sampling
        self.store = WeightStore(settings.weights_dir, settings.weights.keep)
        # With int8 rollouts the engine loads the store's int8 variant, derived once per version
        # by the publisher; `model_path` is then the int8 start checkpoint the driver wrote.
        # Per-replica settings follow the slot: a replacement serves what the worker it replaces did.
        self.variant = "int8" if gen.quantization_of(index if slot is None else slot) == "int8" else None
        assert gen.seed is not None  # JobConfig resolves every component seed when it validates
        self.engine = VLLMEngine(
            model_path,
            gen,
            dtype=settings.engine_dtype,
            seed=gen.seed + index,
            name=self.name,
            on_step=self._on_engine_step,
            adapters=settings.adapters,
            routed_experts=settings.routed_experts(model_path, torch.cuda.is_available()),
            images=settings.engine_images(model_path),
        )
        self.labels.of(m.GENERATION_VERSION).set(0)
        self.placeholders = placeholder_ids(self.engine.engine)
        # Multi-turn: a fresh environment per episode (None: one response per prompt).
        self.environment = load_environment(gen.environment) if gen.environment else None
        # Agent episodes: the user's agent drives each sample through this worker's own gateway.
        self.agents = None
        if gen.agent:
            from rlhf_cluster.gateway.runner import AgentRunner  # FastAPI and uvicorn load only where a gateway serves

            self.agents = AgentRunner(self.engine, gen)
        self.agent_counters = AgentCounters(self.labels)
        self._one_request = asyncio.Lock()  # batched mode: requests run one after another
        # The job's transport, and the store's (its versions reach the engine as deliveries too).
        transport, stored = engine_transports(
            settings.weights, self.store, gen.weight_variants, getattr(torch, settings.engine_dtype), get=ray.get
        )
        self.receiver = WeightReceiver(
            self.engine,
            self.store,
            transport,
            stored,
            self.variant or "full",
            self.name,
            WeightLoadMetrics(self.labels),
            requests=self._one_request if gen.mode == "batched" else None,  # loads only between requests
        )

    def _on_engine_step(self, running: int, waiting: int) -> None:
        """Called by the engine loop after every step with vLLM's scheduler counts."""
        self.labels.of(m.GENERATION_ENGINE_BATCH).observe(running)
        self.labels.of(m.GENERATION_IN_FLIGHT).set(running + waiting)
        self.stall.stepped(running + waiting)

    def info_extra(self) -> dict:
        return {"version": self.engine.version, "variant": self.variant or "full", "engine": id(self.engine)}

    def engine_stats(self) -> dict:
        """vLLM's batch sizes so far, the version held, requests in flight, the weight loads and the
        speculative-decoding counters."""
        return {
            **self.engine.batches.stats(),
            "version": self.engine.version,
            "in_flight": self.engine.in_flight(),
            "engine": id(self.engine),
            "swaps": [asdict(swap) for swap in self.receiver.swaps],
            "speculative": self.engine.speculative_stats(),
        }

    async def sync(self, min_version: int = 0) -> int:
        """Load the store's newest version unless the engine holds it already; the version held."""
        return await self.receiver.sync(min_version)

    async def load_stored(self, min_version: int = 0) -> Receipt:
        """The store's newest version, through the one load path (`WeightReceiver.load_stored`)."""
        return await self.receiver.load_stored(min_version)

    async def load(self, delivery: Delivery) -> Receipt:
        """Load a pushed version in place, with requests in flight (`WeightReceiver.load`)."""
        return await self.receiver.load(delivery)

    def corrupt_next_delivery(self, bucket: int) -> None:
        """Test hook: the next delivery's `bucket` arrives with one byte flipped (as if damaged in transit)."""
        self.receiver.transport.corrupt_bucket = bucket

    async def _groups(
        self, prompts: list[Prompt], n: int | None = None, greedy: bool = False, sampling: SamplingConfig | None = None
    ) -> list[Rollout]:
        """`n` rollouts of each prompt (one greedy); `sampling`: single-turn generation's, in place of
        the training one (held-out evaluation's: preflight refuses `data.eval_sampling` with episodes)."""
        if self.agents is not None:
            rollouts = await self._agent_episodes(prompts, n, greedy)
        elif self.environment is not None:
            rollouts = await self._episodes(prompts, n, greedy)
        else:
            futures = [asyncio.wrap_future(self.engine.submit_group(p, n, greedy, sampling=sampling)) for p in prompts]
            rollouts = [r for group in await asyncio.gather(*futures) for r in group]
            count_tokens(self.labels, rollouts)
        # A vision-language model's sampled placeholder has no image: such a sample cannot be trained on.
        return fail_sampled_placeholders(rollouts, self.placeholders) if self.placeholders else rollouts

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
        return count_episodes(self.labels, done)

    async def _agent_episodes(self, prompts: list[Prompt], n: int | None, greedy: bool) -> list[Rollout]:
        """Agent episodes: `n` calls of the user's agent per prompt (one greedy), all at once."""
        agents = self.agents
        assert agents is not None  # `_groups` runs agent episodes only with an agent runner
        done = await self._per_sample(
            prompts, n, greedy, lambda p, group_id, sample_id: agents.episode(p, group_id, sample_id, greedy)
        )
        return self.agent_counters.count(agents, done)

    async def generate_group(self, prompt: Prompt, min_version: int) -> list[Rollout]:
        """Streaming: the `n` rollouts of one prompt, started at once with weights of version >=
        `min_version`; returns when its last response finishes (other calls keep decoding)."""
        # The driver pushes every version (a rollback's too) before it is needed. Every load's
        # probe report goes back on the load's receipt.
        await self.receiver.hold(min_version)
        with tracing.span("generate", prompt=prompt.prompt_id):
            return await self._groups([prompt])

    async def generate(self, prompts: list[Prompt], min_version: int) -> list[Rollout]:
        """Batched: `n` rollouts per prompt with weights of version >= `min_version`, returned
        together when the slowest finishes."""
        await self.receiver.hold(min_version)  # outside the request lock: the delivery it waits for takes that lock
        async with self._one_request:
            with tracing.span("generate", prompts=len(prompts)):
                return await self._groups(prompts)

    async def evaluate(self, prompts: list[Prompt], min_version: int, samples: int = 0) -> list[Rollout]:
        """Held-out evaluation with weights of version >= `min_version`: one greedy response per
        prompt, or with `samples` > 0 that many sampled ones (`data.eval_sampling` over training's settings)."""
        await self.receiver.hold(min_version)
        return await self._groups(prompts, samples or None, samples == 0, self.eval_sampling)

    def refused_versions(self) -> list[int]:
        return self.receiver.refused_versions()

    async def logprobs_of(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        return await asyncio.to_thread(self.engine.logprobs_of, prompt_ids, response_ids)
