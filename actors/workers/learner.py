"""LearnerRank actors: the policy's FSDP2 or DeepSpeed ranks (one `RankGroup`), which train and publish weights."""

from __future__ import annotations

import os
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import torch

from actors.workers._common import Worker, join_process_group, rendezvous_address
from actors.workers.settings import CriticRankSettings, LearnerRankSettings
from rlhf_cluster.experience.records import TrainBatch
from rlhf_cluster.generation.probe import PROBE_FILE, Probe, probe_file
from rlhf_cluster.learner import create_learner
from rlhf_cluster.learner.step_metrics import held_policy_metrics
from rlhf_cluster.models.quantization import quantize_state_dict
from rlhf_cluster.telemetry import metrics as m
from rlhf_cluster.telemetry import tracing
from rlhf_cluster.weights import WeightStore
from rlhf_cluster.weights.buckets import now as delivery_time
from rlhf_cluster.weights.buckets import persisted
from rlhf_cluster.weights.messages import Delivery, Publication
from rlhf_cluster.weights.registry import build_transport
from rlhf_cluster.weights.shares import Dealer

if TYPE_CHECKING:
    from collections.abc import Callable

    from rlhf_cluster.learner.base import LearnerBase
    from rlhf_cluster.weights.transports import WeightTransport


class ShardedRank(Worker):
    """What every rank of a sharded group (policy learner, critic) answers besides its step:
    the rendezvous address, its setup (join the group, build its learner) and its checkpoint;
    its name, labels, `info` and heartbeat are a `Worker`'s (`rank<i>` in the group's pool).
    Subclasses set `settings`, `rank`, `world_size` and `checkpoint_write`, and build their
    learner in `_build_learner`."""

    learner: Any
    checkpoint_write: Future | None
    settings: LearnerRankSettings | CriticRankSettings
    rank: int
    world_size: int

    def address(self) -> tuple[str, int]:
        """Host and a free port for the process group's rendezvous (asked of rank 0)."""
        return rendezvous_address()

    def setup(self, master_addr: str, master_port: int) -> dict:
        """Join the group's process group and shard the model (all ranks at once)."""
        join_process_group(master_addr, master_port, self.rank, self.world_size, self.settings.collective_timeout_s)
        self.learner = self._build_learner()
        return self.info()

    def _build_learner(self) -> Any:
        raise NotImplementedError

    def state_digest(self) -> str:
        """The digest of this rank's model and optimizer shards, scheduler and step (as checkpoints record it)."""
        return self.learner.state_digest()

    def save_checkpoint(self, directory: str) -> str:
        """Stage this rank's state and write it in the background; returns the staged state's digest."""
        if self.checkpoint_write is not None:
            self.checkpoint_write.result()  # one checkpoint at a time
        self.checkpoint_write, digest = self.learner.save_checkpoint(directory)
        return digest

    def wait_checkpoint(self) -> None:
        """Block until this rank's last checkpoint write is on disk (raises what the write raised)."""
        if self.checkpoint_write is not None:
            write, self.checkpoint_write = self.checkpoint_write, None
            write.result()

    def load_checkpoint(self, directory: str) -> str:
        """Restore this rank from a checkpoint, then take this job's optimizer settings over the
        checkpoint's; returns the digest of the state as restored."""
        digest = self.learner.load_checkpoint(directory)
        self.learner.apply_settings()
        return digest

    def shard_info(self) -> dict[str, tuple[int, int]]:
        return self.learner.shard_info()


# A second thread answers wait_published while a step runs; heartbeats have a thread of their own,
# and so has rank 0's part of pushing a version (`send`), which runs while the next step trains.
@ray.remote(  # type: ignore[call-overload]  # ray's stubs lack max_concurrency and concurrency_groups
    max_concurrency=2, concurrency_groups={"health": 1, "weights": 1}
)
class LearnerRank(ShardedRank):
    """One rank of the learner group; rank 0 also publishes versions to the weight store."""

    settings: LearnerRankSettings

    def __init__(
        self, settings: LearnerRankSettings, model_path: str, rank: int, world_size: int, probe: Probe | None = None
    ):
        super().__init__(settings.basics, "learner", f"rank{rank}")
        self.settings = s = settings
        self.model_path, self.rank, self.world_size = model_path, rank, world_size
        self.probe = probe
        # The int8 rollout variant is derived here, once per version, for every generation worker
        # (the store's by rank 0, which alone writes it; a share's by the rank that sends it).
        variants: dict[str, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = {}
        if "int8" in s.weight_variants and rank == 0:
            variants["int8"] = partial(quantize_state_dict, float_dtype=getattr(torch, s.engine_dtype))
        self.store = WeightStore(s.weights_dir, s.weights.keep, variants=variants)
        self.pending: dict[int, Future] = {}
        self.engine_dtype = getattr(torch, s.engine_dtype)
        # Every rank has the job's transport: rank 0 publishes every version, and where the
        # transport deals versions to the ranks (`shares`) each rank publishes its share.
        self.transport = build_transport(
            s.weights,
            self.store,
            list(s.weight_variants),
            self.engine_dtype,
            put=ray.put,
            host=ray.util.get_node_ip_address(),
        )
        self.checkpoint_write: Future | None = None
        self.learner: LearnerBase | None = None
        if not torch.cuda.is_available():
            weight_bytes = sum(
                f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in Path(model_path).glob(pattern)
            )
            torch.set_num_threads(s.spec.learner.cpu_threads_per_rank(os.cpu_count() or 1, weight_bytes))

    def _set_up(self) -> LearnerBase:
        """The learner `setup` built: a collective called before it is the driver's bug."""
        if self.learner is None:
            raise RuntimeError(f"learner rank {self.rank}: called before setup()")
        return self.learner

    def _publisher(self) -> WeightTransport:
        """Rank 0's transport: rank 0 sends versions and waits for their store writes."""
        if self.rank != 0:
            raise RuntimeError(f"learner rank {self.rank}: only rank 0 sends versions and writes the store")
        return self.transport

    def _build_learner(self) -> LearnerBase:
        return create_learner(self.settings.spec, self.model_path)  # learner.backend picks the class

    def publish(self, version: int, persist: bool = False, created_at: str | None = None) -> None:
        """Collective: score the mismatch probe, then gather the weights one tensor at a time;
        rank 0 streams them, cast to the engine's dtype, to the job's transport and returns (see
        `rlhf_cluster.weights.transports`), or, where the transport deals versions to the ranks,
        each rank streams its share (`shares.Dealer`; the driver merges the parts). The version
        is also a durable snapshot in the store when one is due, or when `persist` forces it (the
        start, a restored checkpoint). `created_at`: the version's identity, the same on every
        rank (the trainer's); by default now, on rank 0."""
        learner = self._set_up()
        files = {}
        if self.probe is not None:
            logprobs = learner.probe_logprobs(self.probe.prompt_ids, self.probe.response_ids)
            files[PROBE_FILE] = probe_file(self.probe, logprobs)
        s = self.settings
        snapshot = persist or persisted(
            version, s.weights.persist_every, s.checkpoint_every, s.total_steps, s.reference_refresh_every
        )
        dealer = None
        if self.world_size > 1 and self.transport.shares(snapshot) and learner.deals_engine_tensors():
            dealer = Dealer(self.world_size, self.rank, self.engine_dtype)
        # What the engines hold is what leaves the device and goes on disk too: cast there (no
        # fp32 copy when the engine runs bf16), a tied output embedding once; LoRA: the adapters alone.
        named = learner.named_engine_tensors(self.engine_dtype, None if dealer is None else dealer.owner)
        if dealer is None and self.rank != 0:
            for _ in named:  # this rank's part of every gather
                pass
            return
        created_at = created_at or delivery_time()
        self.pending[version] = self.transport.publish(
            version, created_at, named, files if self.rank == 0 else {}, snapshot
        )

    def wait_persisted(self) -> None:
        """Block until every queued store write is durable (rank 0; raises what a write raised)."""
        self._publisher().wait_persisted()

    @ray.method(concurrency_group="weights")
    def send(self, delivery: Delivery) -> None:
        """Rank 0's part of pushing `delivery` to the engines its `seat` names, for a transport
        whose sender takes part (`Delivery.sender`), while the engines fetch it."""
        self._publisher().send(delivery)

    def wait_published(self, version: int) -> Publication:
        """Block until the transport has published `version`; returns the publication (times,
        bytes and the `delivery` to push to the engines)."""
        publication: Publication = self.pending.pop(version).result()
        self.labels.of(m.LEARNER_VERSION).set(version)
        self.labels.of(m.WEIGHTS_PUBLISHED_BYTES).inc(publication.bytes)
        for variant, seconds in publication.variant_seconds.items():
            self.labels.of(m.WEIGHTS_VARIANT_SECONDS, variant=variant).observe(seconds)
        return publication

    def train(
        self,
        batch: TrainBatch,
        version: int,
        kl_coef: float,
        created_at: str | None = None,
        reset_optimizer: bool = False,
    ) -> tuple[dict[str, float], Publication | None]:
        """One learner step on this rank's share, then publish the result as `version`. Returns the
        step's metrics and, when the publication is complete already (rank 0's, e.g. packed in the
        object store, or this rank's share), what `wait_published` would: the driver pushes it
        without another round trip. `reset_optimizer`: clear the optimizer's state after the update
        (`algorithm.kl.reference_refresh.reset_optimizer`)."""
        with tracing.span("train_step", version=version):
            learner = self._set_up()
            metrics = learner.train_step(batch, kl_coef)
            if reset_optimizer:
                learner.reset_optimizer()
                metrics["learner/optimizer_reset"] = 1.0
        self.labels.of(m.LEARNER_STEP_SECONDS).observe(metrics["learner/step_seconds"])
        self.labels.of(m.LEARNER_TOKENS).inc(float(batch.response_mask.sum()))
        return metrics, self._publish_step(version, created_at)

    def hold(
        self, batch: TrainBatch, version: int, created_at: str | None = None
    ) -> tuple[dict[str, float], Publication | None]:
        """Collective: a critic warm-up step (`critic.freeze_policy_steps`) on this rank's share. The
        policy runs no training pass (only the mismatch probe's forward, as every publish), so its
        optimizer state, the LR schedule's position and the learner's step count (its own updates)
        stay, and its unchanged weights are published as `version` (every step publishes one).
        Returns what `train` does, with the batch's metrics over every rank's share
        (`held_policy_metrics`)."""
        metrics = held_policy_metrics(batch, self._set_up().device)
        return metrics, self._publish_step(version, created_at)

    def _publish_step(self, version: int, created_at: str | None) -> Publication | None:
        """Publish a step's weights as `version`; the publication when it is complete already."""
        with tracing.span("publish", version=version):
            self.publish(version, created_at=created_at)
        publication = self.pending.get(version)
        return self.wait_published(version) if publication is not None and publication.done() else None

    def probe_logprobs(
        self,
        prompt_ids: list[list[int]],
        response_ids: list[list[int]],
        images: list[tuple[bytes, ...]] | None = None,
    ) -> list[list[float]]:
        """Collective: the policy's fp32 log-probs of fixed sequences (what an engine holding the
        published weights should report); a vision-language policy's with each sequence's images."""
        return self._set_up().probe_logprobs(prompt_ids, response_ids, images)

    def reference_logprobs(self, batch: TrainBatch) -> list[list[float]] | None:
        """Collective: the reference log-probs the learner would train this batch against when it
        computes them itself (LoRA: base model, adapters off); None when they come from scoring."""
        ref = self._set_up().reference_logprobs(batch)
        if ref is None:
            return None
        lengths = (batch.attention_mask.sum(1) - batch.prompt_lengths).tolist()
        return [ref[i, :n].float().cpu().tolist() for i, n in enumerate(lengths)]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective; rank 0 returns the gathered weights, other ranks an empty dict."""
        return self._set_up().full_state_dict()
