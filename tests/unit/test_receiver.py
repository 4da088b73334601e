"""The engine's receiving end (`WeightReceiver`) without Ray or vLLM: a fake engine, the real
store and transports (the object store a list, as in test_weight_transports). Every receipt kind
(loaded, held, refused, superseded, interrupted), who proved each, and `hold`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
import torch

from rlhf_cluster.config import DirectTransport, FilesystemTransport, WeightsConfig
from rlhf_cluster.generation.probe import PROBE_FILE, Probe, probe_file
from rlhf_cluster.generation.receiver import Swap, WeightReceiver
from rlhf_cluster.weights import WeightStore
from rlhf_cluster.weights.buckets import now
from rlhf_cluster.weights.messages import Delivery, ProbeReport, VariantLink
from rlhf_cluster.weights.registry import build_transport, engine_transports
from rlhf_cluster.weights.transports import DeliveryInterrupted, WeightTransport
from tests.object_store import ObjectStore

TENSORS = {
    "model.embed_tokens.weight": torch.randn(16, 8).to(torch.bfloat16),
    "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8).to(torch.bfloat16),
    "model.norm.weight": torch.randn(8).to(torch.bfloat16),
}


@dataclass
class FakeSwap:
    version: int
    paused_seconds: float = 0.01
    resumed: int = 2
    aborted: int = 1
    tokens_of_previous: int = 7


class FakeEngine:
    """What the receiver uses of `VLLMEngine`: the version held, in-place loads, probe log-probs."""

    def __init__(self):
        self.version = 0
        self.loads: list[tuple[int, dict[str, torch.Tensor]]] = []

    def load_weights(self, version, weights):
        self.loads.append((version, dict(weights)))
        self.version = version
        return FakeSwap(version)

    def logprobs_of_many(self, prompts, responses):
        return [[-1.0] * len(r) for r in responses]


class Metrics:
    """`ReceiverMetrics` that keeps every call, in order."""

    def __init__(self):
        self.calls: list[tuple] = []

    def loaded(self, swap: Swap) -> None:
        self.calls.append(("loaded", swap.version))

    def refused(self, versions_behind: int) -> None:
        self.calls.append(("refused", versions_behind))

    def mismatched(self) -> None:
        self.calls.append(("mismatched",))

    def probed(self, report: ProbeReport) -> None:
        self.calls.append(("probed", report.version))


class Job:
    """A direct-transport job: the learner's side (`sender`, packing into the object store and
    snapshotting into the store) and one engine's receiver."""

    def __init__(self, tmp_path, kind=DirectTransport, requests: asyncio.Lock | None = None, wait_s: float = 5.0):
        self.objects = ObjectStore()
        fields = {"bucket_mb": 0.0001} if kind is DirectTransport else {}
        cfg = WeightsConfig(transport=kind(**fields))
        self.store = WeightStore(tmp_path / "store")
        self.sender = build_transport(cfg, self.store, ["full"], torch.bfloat16, put=self.objects.put)
        job, stored = engine_transports(
            cfg, WeightStore(tmp_path / "store"), ["full"], torch.bfloat16, get=self.objects.get
        )
        self.engine, self.metrics = FakeEngine(), Metrics()
        self.receiver = WeightReceiver(
            self.engine, job.store, job, stored, "full", "gen0", self.metrics, requests=requests, wait_s=wait_s
        )

    def publish(self, version: int, snapshot: bool = False, files: dict | None = None, shift: float = 0.0) -> Delivery:
        named = [(k, v + shift) for k, v in TENSORS.items()]
        delivery = self.sender.publish(version, now(), iter(named), files or {}, snapshot=snapshot).result().delivery
        self.sender.wait_persisted()
        return delivery


def test_a_pushed_version_is_loaded_proven_by_its_sender_and_scored_by_its_probe(tmp_path):
    job = Job(tmp_path)
    probe = probe_file(Probe([[1, 2], [3]], [[4, 5], [6]]), [[-1.0, -1.5], [-0.5]])
    delivery = job.publish(1, files={PROBE_FILE: probe})
    receipt = asyncio.run(job.receiver.load(delivery))
    assert (receipt.status, receipt.version, receipt.held_version, receipt.proven_by) == ("loaded", 1, 1, "sender")
    assert receipt.proven and receipt.fingerprint == receipt.sent_fingerprint == delivery.link("full").fingerprint
    assert receipt.bytes > 0 and receipt.seconds > 0
    assert job.engine.version == 1 and all(torch.equal(job.engine.loads[0][1][k], v) for k, v in TENSORS.items())
    # The probe: the learner's log-probs against the engine's (-1.0 each), three tokens.
    assert receipt.probe is not None and receipt.probe.version == 1 and receipt.probe.mismatch.tokens == 3
    assert receipt.probe.mismatch.max_abs_diff == pytest.approx(0.5)
    assert job.receiver.swaps == [Swap(1, 0.01, 2, 1, 7, receipt.seconds, receipt.bytes, "direct")]
    assert job.metrics.calls == [("loaded", 1), ("probed", 1)]
    assert (job.receiver.loaded, job.receiver.fingerprint) == (delivery.identity, receipt.fingerprint)


def test_a_version_held_already_is_not_loaded_again_and_keeps_its_proof(tmp_path):
    job = Job(tmp_path)
    delivery = job.publish(1, snapshot=True)
    first = asyncio.run(job.receiver.load(delivery))
    again = asyncio.run(job.receiver.load(delivery))
    assert (again.status, again.proven_by, again.fingerprint) == ("held", "sender", first.fingerprint)
    # The store's newest is the same version, brought by the push: held, with the push's proof
    # (the store's fingerprint of it differs from the object store's).
    stored = asyncio.run(job.receiver.load_stored(0))
    assert (stored.status, stored.version, stored.proven_by, stored.fingerprint) == (
        "held",
        1,
        "sender",
        first.fingerprint,
    )
    assert len(job.engine.loads) == 1 and job.metrics.calls == [("loaded", 1)]


def test_the_stores_newest_is_loaded_proven_by_the_stores_manifest(tmp_path):
    job = Job(tmp_path)
    job.publish(1, snapshot=True)
    job.publish(2, snapshot=True, shift=1.0)
    receipt = asyncio.run(job.receiver.load_stored(1))
    assert (receipt.status, receipt.version, receipt.proven_by) == ("loaded", 2, "store")
    assert asyncio.run(job.receiver.sync(2)) == 2 and len(job.engine.loads) == 1  # held: not read again
    with pytest.raises(RuntimeError, match="version >= 3 requested but the store's newest is 2"):
        asyncio.run(job.receiver.load_stored(3))


def test_damaged_bytes_are_refused_counted_and_the_engine_keeps_its_version(tmp_path):
    job = Job(tmp_path)
    asyncio.run(job.receiver.load(job.publish(1)))
    delivery = job.publish(2, shift=1.0)
    assert len(delivery.link("full").buckets) > 1
    job.receiver.transport.corrupt_bucket = 1
    receipt = asyncio.run(job.receiver.load(delivery))
    assert (receipt.status, receipt.proven_by, receipt.held_version) == ("refused", None, 1)
    assert "bucket 1: checksum" in receipt.reason and receipt.fingerprint is None
    assert job.engine.version == 1 and job.receiver.refused_versions() == [2] and job.receiver.refused_up_to == 2
    assert job.metrics.calls[1:] == [("mismatched",), ("refused", 1)]
    asyncio.run(job.receiver.hold(2))  # a request needing the refused version goes on with the one held


def test_a_stored_version_that_fails_its_checksums_is_refused_once_and_not_read_again(tmp_path):
    job = Job(tmp_path, kind=FilesystemTransport)
    job.publish(1, snapshot=True)
    shard = next((tmp_path / "store" / "v00000001").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    receipt = asyncio.run(job.receiver.load_stored(0))
    assert (receipt.status, receipt.proven) == ("refused", False) and "checksum" in receipt.reason
    again = asyncio.run(job.receiver.load_stored(0))
    assert (again.status, again.reason) == ("refused", "refused before")
    assert job.engine.loads == []
    # A filesystem job's store is its push transport too: the refusal counts as a mismatch.
    assert job.metrics.calls == [("mismatched",), ("refused", 1)]


def test_a_version_retention_removed_is_superseded_and_nothing_changes(tmp_path):
    job = Job(tmp_path, kind=FilesystemTransport)
    delivery = job.publish(1, snapshot=True)
    job.store.discard_from(1)  # as retention (or a rollback) removes it
    receipt = asyncio.run(job.receiver.load(delivery))
    assert (receipt.status, receipt.proven, receipt.held_version) == ("superseded", False, 0)
    assert "has left the store" in receipt.reason
    assert job.engine.loads == [] and job.receiver.refused == set() and job.metrics.calls == []


class Interrupting(WeightTransport):
    """A transport whose push group lost a member (as `collective`'s does when one dies)."""

    type = "collective"

    def publish(self, version, created_at, named, files, snapshot):
        raise NotImplementedError

    def fetch(self, delivery, variant, reader):
        raise DeliveryInterrupted("rank 2 of the group did not answer")


def test_an_interrupted_push_is_answered_as_such_and_nothing_changes(tmp_path):
    store = WeightStore(tmp_path / "store")
    transport = Interrupting(WeightsConfig(), store, ["full"], torch.bfloat16)
    stored = build_transport(WeightsConfig(transport=FilesystemTransport()), store, ["full"], torch.bfloat16)
    engine, metrics = FakeEngine(), Metrics()
    receiver = WeightReceiver(engine, store, transport, stored, "full", "gen1", metrics)
    delivery = Delivery("collective", 4, now(), {"full": VariantLink("f" * 64)}, sender=True)
    receipt = asyncio.run(receiver.load(delivery))
    assert (receipt.worker, receipt.status, receipt.version, receipt.proven) == ("gen1", "interrupted", 4, False)
    assert "did not answer" in receipt.reason and receipt.sent_fingerprint == "f" * 64
    assert engine.loads == [] and receiver.refused == set() and metrics.calls == []


def test_hold_waits_for_the_version_a_request_needs(tmp_path):
    job = Job(tmp_path)
    delivery = job.publish(1)

    async def scenario():
        waiting = asyncio.create_task(job.receiver.hold(1))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # the engine holds version 0
        await job.receiver.load(delivery)
        await asyncio.wait_for(waiting, 5)
        await job.receiver.hold(0)  # held already: no wait

    asyncio.run(scenario())


def test_hold_gives_up_after_its_bound_naming_what_the_engine_holds(tmp_path):
    job = Job(tmp_path, wait_s=0.05)
    with pytest.raises(TimeoutError, match=r"gen0: no delivery of version >= 3 within 0.05 s \(the engine holds 0\)"):
        asyncio.run(job.receiver.hold(3))


def test_in_batched_mode_a_load_waits_for_the_request_running(tmp_path):
    requests = asyncio.Lock()
    job = Job(tmp_path, requests=requests)
    delivery = job.publish(1)

    async def scenario():
        async with requests:  # a request is running
            loading = asyncio.create_task(job.receiver.load(delivery))
            await asyncio.sleep(0.05)
            assert not loading.done() and job.engine.version == 0
        assert (await asyncio.wait_for(loading, 5)).status == "loaded"

    asyncio.run(scenario())
