"""Both ends of every weight transport, without Ray: the object store is a list (put appends,
get reads back), the store a temp directory. And the rule that only `rlhf_cluster/weights/`
knows the transports: no actor names one."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
import torch

from rlhf_cluster.config import (
    CollectiveTransport,
    DirectTransport,
    FilesystemTransport,
    WeightsConfig,
    WeightTransport,
)
from rlhf_cluster.weights import WeightStore
from rlhf_cluster.weights.buckets import now
from rlhf_cluster.weights.messages import ProbeMismatch, ProbeReport, Publication, Receipt
from rlhf_cluster.weights.registry import TRANSPORTS, build_transport, engine_transports
from rlhf_cluster.weights.shares import Dealer, merge_publications
from rlhf_cluster.weights.transports import WeightRefused, stored_delivery
from tests.object_store import ObjectStore

REPO = Path(__file__).resolve().parents[2]
TENSORS = {
    "model.embed_tokens.weight": torch.randn(32, 8),
    "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8),
    "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8),
    "model.layers.1.self_attn.q_proj.weight": torch.randn(8, 8),
    "model.norm.weight": torch.randn(8),
}


def _transport(kind, tmp_path, objects: ObjectStore, **fields):
    cfg = WeightsConfig(transport=kind(**fields))
    return build_transport(cfg, WeightStore(tmp_path / "store"), ["full"], torch.bfloat16, put=objects.put, get=objects.get)


@pytest.mark.parametrize("kind", [FilesystemTransport, DirectTransport])
def test_a_delivery_fetches_the_published_tensors_and_proves_them(kind, tmp_path):
    objects = ObjectStore()
    sender = _transport(kind, tmp_path, objects, **({"bucket_mb": 0.001} if kind is DirectTransport else {}))
    receiver = _transport(kind, tmp_path, objects, **({"bucket_mb": 0.001} if kind is DirectTransport else {}))
    assert type(sender).type == kind().type
    named = [(k, v.to(torch.bfloat16)) for k, v in TENSORS.items()]
    publication = sender.publish(3, now(), iter(named), {"probe.json": "{}"}, snapshot=False).result(timeout=60)
    delivery = publication.delivery
    assert delivery.version == 3 and delivery.transport == kind().type and delivery.files == {"probe.json": "{}"}
    fetched = receiver.fetch(delivery, "full", "gen0")
    assert fetched.version == 3 and fetched.created_at == delivery.created_at
    assert fetched.fingerprint == delivery.link("full").fingerprint
    got = dict(fetched.tensors)
    assert set(got) == set(TENSORS)
    for name, tensor in named:
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], tensor), name
    assert fetched.nbytes >= sum(t.numel() * 2 for t in TENSORS.values())


def test_damaged_bytes_are_refused_by_every_transport(tmp_path):
    objects = ObjectStore()
    direct = _transport(DirectTransport, tmp_path / "d", objects, bucket_mb=0.0001)
    delivery = direct.publish(1, now(), iter(TENSORS.items()), {}, snapshot=False).result().delivery
    assert len(delivery.link("full").buckets) > 1
    direct.corrupt_bucket = 1
    with pytest.raises(WeightRefused, match="bucket 1: checksum"):
        direct.fetch(delivery, "full", "gen0")
    assert direct.fetch(delivery, "full", "gen0").fingerprint == delivery.link("full").fingerprint  # hook used once

    store = _transport(FilesystemTransport, tmp_path / "f", objects)
    delivery = store.publish(1, now(), iter(TENSORS.items()), {}, snapshot=True).result().delivery
    shard = next((tmp_path / "f" / "store" / "v00000001").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(WeightRefused, match="checksum"):
        store.fetch(delivery, "full", "gen0")


def test_the_stores_newest_version_is_a_filesystem_delivery_like_any_other(tmp_path):
    """Whatever the job's transport, an engine loads the store's versions through the one load
    path: `stored_delivery` declares the fingerprint, the store's fetch proves it and brings the
    files stored beside the version (the probe)."""
    objects = ObjectStore()
    direct = _transport(DirectTransport, tmp_path, objects)
    direct.publish(1, now(), iter(TENSORS.items()), {"probe.json": "{}"}, snapshot=True).result()
    direct.wait_persisted()
    job, stored = engine_transports(direct.cfg, direct.store, ["full"], torch.bfloat16, get=objects.get)
    assert (job.type, stored.type) == ("direct", "filesystem")
    delivery = stored_delivery(direct.store, 1, ["full"])
    assert delivery.transport == "filesystem" and delivery.identity[0] == 1 and delivery.files == {}
    fetched = stored.fetch(delivery, "full", "gen0")
    assert fetched.fingerprint == delivery.link("full").fingerprint and fetched.files == {"probe.json": "{}"}
    fs_job, fs_stored = engine_transports(WeightsConfig(transport=FilesystemTransport()), direct.store, ["full"],
                                          torch.bfloat16)
    assert fs_job is fs_stored  # a filesystem job's engines have one transport


def test_messages_are_typed_and_receipts_prove_against_what_was_sent(tmp_path):
    objects = ObjectStore()
    direct = _transport(DirectTransport, tmp_path, objects)
    publication = direct.publish(1, now(), iter(TENSORS.items()), {}, snapshot=False).result()
    assert isinstance(publication, Publication) and publication.bytes > 0 and publication.seconds >= 0
    delivery = publication.delivery
    assert delivery.link("full").buckets and delivery.without_payloads().link("full").buckets == ()
    with pytest.raises(KeyError, match="int8"):
        delivery.link("int8")
    sent = delivery.link("full").fingerprint
    loaded = Receipt.judged("gen0", delivery, "full", "loaded", "sender", fingerprint=sent)
    other = Receipt.judged("gen1", delivery, "full", "loaded", "sender", fingerprint="0" * 64)
    refused = Receipt.judged("gen2", delivery, "full", "refused", "sender", sent, reason="bucket 1: checksum")
    assert loaded.proven and not other.proven and not refused.proven and refused.sent_fingerprint == sent
    assert (loaded.proven_by, other.proven_by, refused.proven_by) == ("sender", None, None)
    assert loaded.version == 1 and refused.reason == "bucket 1: checksum"
    report = ProbeReport("gen0", 1, 1, "full", delivery.created_at, 0.5, 10, ProbeMismatch(0.0, 1e-7, 0.0, 3))
    assert report.mismatch.k3 == 1e-7 and report.record()["k3"] == 1e-7 and "mismatch" not in report.record()


def test_a_stored_version_republished_after_a_rollback_is_not_taken_for_an_older_delivery(tmp_path):
    objects = ObjectStore()
    store = _transport(FilesystemTransport, tmp_path, objects)
    old = store.publish(2, now(), iter(TENSORS.items()), {}, snapshot=False).result().delivery
    store.store.discard_from(2)  # the rollback abandons version 2; the same number is published again
    new = store.publish(2, now(), iter(TENSORS.items()), {}, snapshot=False).result().delivery
    assert old.created_at != new.created_at
    with pytest.raises(WeightRefused, match="created at"):
        store.fetch(old, "full", "gen0")
    assert store.fetch(new, "full", "gen0").fingerprint == new.link("full").fingerprint


def test_direct_snapshots_reach_the_store_and_are_waited_for(tmp_path):
    objects = ObjectStore()
    direct = _transport(DirectTransport, tmp_path, objects)
    direct.publish(1, now(), iter(TENSORS.items()), {}, snapshot=False).result()
    direct.publish(2, now(), iter(TENSORS.items()), {}, snapshot=True).result()
    direct.wait_persisted()
    assert direct.store.versions() == [2]


def test_every_config_transport_has_a_class():
    kinds = set(typing.get_args(typing.get_args(WeightTransport)[0]))
    assert set(TRANSPORTS) == kinds == {FilesystemTransport, DirectTransport, CollectiveTransport}
    assert {cls.type for cls in TRANSPORTS.values()} == {kind().type for kind in kinds}


# What "knowing a transport" looks like in code: naming its config class or its `type` string,
# or reading `weights.transport`. Only rlhf_cluster/weights/ (and the config that declares them) may.
KNOWS_A_TRANSPORT = re.compile(
    r"DirectTransport|FilesystemTransport|CollectiveTransport|weights\.transport\b|[\"'](direct|filesystem|collective)[\"']"
)


def test_no_actor_knows_a_transport():
    offenders = [f"{path.relative_to(REPO)}:{n}: {line.strip()}"
                 for path in sorted((REPO / "actors").rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if KNOWS_A_TRANSPORT.search(line) and not line.lstrip().startswith("#")]
    assert not offenders, "transport-specific code belongs in rlhf_cluster/weights/:\n" + "\n".join(offenders)


def _step(state: dict[str, torch.Tensor], fraction: float, seed: int) -> dict[str, torch.Tensor]:
    """A learner step as a bf16 engine sees it: `fraction` of the elements move."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        moved = torch.rand(t.shape, generator=g) < fraction
        out[name] = torch.where(moved, t + 0.5, t).to(t.dtype)
    return out


def test_sparse_deltas_move_the_changed_elements_and_rebuild_the_exact_weights(tmp_path):
    objects = ObjectStore()
    fields = {"bucket_mb": 0.0001, "delta": "sparse", "full_every": 3}
    sender, engine = (_transport(DirectTransport, tmp_path / side, objects, **fields) for side in ("s", "e"))
    state = {k: torch.randn(64, 32).to(torch.bfloat16) for k in ("model.layers.0.q.weight", "model.layers.1.q.weight")}
    state["model.norm.weight"] = torch.zeros(32, dtype=torch.bfloat16)  # never changes
    full_bytes = sum(t.numel() * 2 for t in state.values())
    late = _transport(DirectTransport, tmp_path / "late", objects, **fields)
    for version in range(1, 6):
        if version > 1:
            state = _step(state, 0.03, version)
            state["model.norm.weight"] = torch.zeros(32, dtype=torch.bfloat16)
        delivery = sender.publish(version, now(), iter(state.items()), {}, snapshot=False).result().delivery
        link = delivery.link("full")
        assert link.whole == (version in (1, 3)), version  # the first and every 3rd go whole
        fetched = engine.fetch(delivery, "full", "gen0")
        assert fetched.fingerprint == link.fingerprint
        got = dict(fetched.tensors)
        assert all(torch.equal(got[k], v) for k, v in state.items())
        if link.whole:
            assert fetched.nbytes >= full_bytes
        else:  # 3% changed: indices (4 B) + values (2 B) for each, and a tensor that did not change costs nothing
            assert fetched.nbytes < 0.25 * full_bytes, (version, fetched.nbytes, full_bytes)
    # An engine that joins late (holds nothing) rebuilds from the whole version 3 and the deltas since.
    fetched = late.fetch(delivery, "full", "gen1")
    assert fetched.fingerprint == delivery.link("full").fingerprint and fetched.nbytes > full_bytes
    assert all(torch.equal(dict(fetched.tensors)[k], v) for k, v in state.items())


def test_a_sparse_delta_applied_to_other_weights_is_refused(tmp_path):
    objects = ObjectStore()
    fields = {"bucket_mb": 0.0001, "delta": "sparse", "full_every": 10}
    sender, engine = (_transport(DirectTransport, tmp_path / side, objects, **fields) for side in ("s", "e"))
    state = {"model.layers.0.q.weight": torch.randn(64, 32).to(torch.bfloat16)}
    engine.fetch(sender.publish(1, now(), iter(state.items()), {}, False).result().delivery, "full", "gen0")
    (identity, held) = engine.held
    engine.held = (identity, {k: v + 1 for k, v in held.items()})  # the engine's copy drifted
    delivery = sender.publish(2, now(), iter(_step(state, 0.03, 2).items()), {}, False).result().delivery
    with pytest.raises(WeightRefused, match="do not match the sender's"):
        engine.fetch(delivery, "full", "gen0")


def test_sparse_encoding_compares_bits_and_falls_back_to_dense():
    from rlhf_cluster.weights import sparse_delta

    old = torch.tensor([0.0, 1.0, float("nan"), 3.0] * 8)
    new = old.clone()
    new[0] = -0.0  # equal as a value, not as bits
    parts = sparse_delta.encode("w", old, new)
    assert [n for n, _ in parts] == ["w::index", "w::value"] and parts[0][1].tolist() == [0]
    rebuilt = sparse_delta.apply({"w": old}, parts)["w"]
    assert torch.equal(rebuilt.view(torch.int32), new.view(torch.int32))
    assert [n for n, _ in sparse_delta.encode("w", old, old + 1)] == ["w"]  # everything changed: whole
    assert [n for n, _ in sparse_delta.encode("w", None, new)] == ["w"]
    with pytest.raises(ValueError, match="does not fit"):
        sparse_delta.apply({"w": old.double()}, parts)
    assert sparse_delta.encode("w", old, old.clone()) == []  # unchanged: nothing to send


def test_a_stored_version_retention_removed_is_superseded_not_refused(tmp_path):
    from rlhf_cluster.weights.transports import WeightSuperseded

    objects = ObjectStore()
    store = _transport(FilesystemTransport, tmp_path, objects)
    store.store.keep = 1
    old = store.publish(1, now(), iter(TENSORS.items()), {}, snapshot=False).result().delivery
    store.publish(2, now(), iter(TENSORS.items()), {}, snapshot=False).result()  # retention removes version 1
    assert store.store.versions() == [2]
    with pytest.raises(WeightSuperseded, match="version 1 has left the store"):
        store.fetch(old, "full", "gen0")


def test_every_rank_sends_its_share_and_the_engine_proves_the_merged_version(tmp_path):
    """`senders: every_rank`: each rank packs the units dealt to it (a decoder layer never split,
    balanced by bytes, the same deal on every rank); the merged delivery fetches, checks and
    proves as one sender's would, with every tensor once."""
    objects = ObjectStore()
    state = {f"model.layers.{i}.{p}.weight": torch.randn(16 * (i + 1), 8) for i in range(4) for p in ("q", "k")}
    state["model.embed_tokens.weight"] = torch.randn(64, 8)
    ranks = [_transport(DirectTransport, tmp_path / f"rank{r}", objects, bucket_mb=0.001, senders="every_rank")
             for r in range(2)]
    assert all(t.shares(snapshot=False) for t in ranks) and not ranks[0].shares(snapshot=True)
    created = now()
    dealers = [Dealer(2, r, torch.bfloat16) for r in range(2)]
    parts = [
        t.publish(5, created, ((n, v) for n, v in state.items() if d.mine(n, v)), {"probe.json": "{}"} if r == 0 else {},
                  snapshot=False).result()
        for r, (t, d) in enumerate(zip(ranks, dealers))
    ]
    assert dealers[0].loads == dealers[1].loads  # both ranks dealt the same way
    names = [{s.name for b in p.delivery.link("full").packed().buckets for s in b.tensors} for p in parts]
    assert names[0] and names[1] and not names[0] & names[1] and names[0] | names[1] == set(state)
    for layer in range(4):  # a layer's tensors go together
        q, k = f"model.layers.{layer}.q.weight", f"model.layers.{layer}.k.weight"
        assert [q in n for n in names] == [k in n for n in names]
    merged = merge_publications(parts)
    assert merged.delivery.files == {"probe.json": "{}"} and merged.bytes == sum(p.bytes for p in parts)
    fetched = ranks[0].fetch(merged.delivery, "full", "gen0")
    assert fetched.fingerprint == merged.delivery.link("full").fingerprint
    assert {n: t.float() for n, t in fetched.tensors}.keys() == state.keys()
    assert all(torch.equal(t, state[n].to(torch.bfloat16)) for n, t in fetched.tensors)
    other = ranks[1].publish(6, now(), iter(state.items()), {}, snapshot=False).result()
    with pytest.raises(ValueError, match="not of one version"):
        merge_publications([parts[0], other])
    assert not _transport(DirectTransport, tmp_path / "r0", objects).shares(snapshot=False)  # rank 0 by default
