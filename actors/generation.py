"""GenerationWorker: a vLLM engine in a Ray actor that pulls weight versions from the store."""

from __future__ import annotations

import os
import time

import ray

from actors._common import actor_setup, metrics_target
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.generation.engine import VLLMEngine
from rlhf_cluster.generation.probe import PROBE_FILE, mismatch, parse_probe_file
from rlhf_cluster import metrics as m
from rlhf_cluster.records import Rollout
from rlhf_cluster.weights import WeightIntegrityError, WeightStore


@ray.remote
class GenerationWorker:
    """Generates rollout groups; before each request it loads the newest published version."""

    def __init__(self, cfg_dict: dict, model_path: str, index: int):
        self.name = f"gen{index}"
        cfg, self.labels, self.metrics_port = actor_setup(cfg_dict, "generation", self.name)
        self.metrics_target = metrics_target(cfg.metrics.bind_address, self.metrics_port)
        self.store = WeightStore(cfg.weights_dir, cfg.weights.keep)
        # With int8 rollouts the engine loads the store's int8 variant, derived once per version
        # by the publisher; `model_path` is then the int8 start checkpoint the driver wrote.
        self.variant = "int8" if cfg.generation.quantization == "int8" else None
        self.engine = VLLMEngine(model_path, cfg.generation, dtype=cfg.model.dtype, seed=cfg.generation.seed + index, name=self.name)
        self.labels.of(m.GENERATION_VERSION).set(0)
        self.loaded: tuple[int, str] | None = None  # (version, created_at) of the weights in the engine
        self.refused: set[tuple[int, str]] = set()
        self.probe_reports: list[dict] = []  # handed to the driver with the next `generate` result

    def info(self) -> dict:
        return {"name": self.name, "metrics": self.metrics_target, "version": self.engine.version, "pid": os.getpid(),
                "variant": self.variant or "full"}

    def sync(self, min_version: int = 0) -> int:
        """Load the store's newest version unless the engine holds it already; returns the version held.

        A version is identified by number and creation time: after a learner rollback the same
        number can be published again with other weights. A version whose checksums fail is
        refused and counted; the engine keeps serving the last good one.
        """
        latest = self.store.latest_version()
        if latest is None or latest < min_version:
            raise RuntimeError(f"{self.name}: version >= {min_version} requested but the store's newest is {latest}")
        start = time.perf_counter()
        try:
            identity = (latest, self.store.manifest(latest)["created_at"])
            if identity == self.loaded or identity in self.refused:
                return self.engine.version
            self.store.acquire(latest, self.name)
        except FileNotFoundError:
            return self.sync(min_version)  # retention removed it after a newer one landed: take that
        try:
            weights = self.store.load(latest, variant=self.variant)
            probe = self.store.read_file(latest, PROBE_FILE)
        except WeightIntegrityError as exc:
            self.labels.of(m.WEIGHTS_REFUSED).inc()
            print(f"{self.name}: refused weight version {latest}: {exc}; keeping version {self.engine.version}", flush=True)
            self.refused.add(identity)
            return self.engine.version
        finally:
            self.store.release(latest, self.name)
        self.engine.load_weights(latest, weights.items())
        self.loaded = identity
        seconds = time.perf_counter() - start
        nbytes = sum(t.numel() * t.element_size() for t in weights.values())
        self.labels.of(m.WEIGHTS_SYNC_SECONDS).observe(seconds)
        self.labels.of(m.WEIGHTS_SYNC_BYTES).inc(nbytes)
        self.labels.of(m.GENERATION_VERSION).set(latest)
        if probe is not None:
            self._score_probe(latest, probe, {"sync_seconds": seconds, "sync_bytes": nbytes, "created_at": identity[1]})
        return latest

    def _score_probe(self, version: int, text: str, sync: dict) -> None:
        """Score the version's probe with the engine and compare with the learner's log-probs."""
        probe, learner_logprobs = parse_probe_file(text)
        engine_logprobs = self.engine.logprobs_of_many(probe.prompt_ids, probe.response_ids)
        report = {"worker": self.name, "pid": os.getpid(), "version": version, "variant": self.variant or "full",
                  **sync, **mismatch(learner_logprobs, engine_logprobs)}
        self.labels.of(m.PROBE_MISMATCH_K3).set(report["k3"])
        self.labels.of(m.PROBE_MAX_DIFF).set(report["max_abs_diff"])
        self.probe_reports.append(report)

    def generate(self, prompts: list[Prompt], min_version: int) -> tuple[list[Rollout], list[dict]]:
        """`n` rollouts per prompt with weights of version >= `min_version`, and the probe reports
        of the syncs since the last call."""
        self.sync(min_version)
        gauge = self.labels.of(m.GENERATION_IN_FLIGHT)
        gauge.inc(len(prompts))
        try:
            rollouts, stats = self.engine.generate(prompts)
        finally:
            gauge.dec(len(prompts))
        self.labels.of(m.GENERATION_TOKENS).inc(stats.tokens)
        reports, self.probe_reports = self.probe_reports, []
        return rollouts, reports

    def evaluate(self, prompts: list[Prompt], min_version: int, samples: int = 0) -> list[Rollout]:
        """Held-out evaluation with weights of version >= `min_version`: one greedy response per
        prompt, or with `samples` > 0 that many sampled ones (training sampling settings)."""
        self.sync(min_version)
        rollouts, _ = self.engine.generate(prompts, n=samples or None, greedy=samples == 0)
        return rollouts

    def refused_versions(self) -> list[int]:
        return sorted(v for v, _ in self.refused)

    def logprobs_of(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        return self.engine.logprobs_of(prompt_ids, response_ids)
