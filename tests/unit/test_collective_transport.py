"""The `collective` transport's two ends over real gloo groups, each member on a thread of this
process (rank 0 hosts the rendezvous store, the engines connect to it), without Ray."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from rlhf_cluster.config import CollectiveTransport, WeightsConfig
from rlhf_cluster.weights import WeightStore
from rlhf_cluster.weights.buckets import now
from rlhf_cluster.weights.messages import Seat
from rlhf_cluster.weights.registry import build_transport
from rlhf_cluster.weights.transports import DeliveryInterrupted, WeightRefused, WeightSuperseded

TENSORS = {
    "model.embed_tokens.weight": torch.randn(32, 8),
    "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8),
    "model.layers.1.self_attn.q_proj.weight": torch.randn(8, 8),
    "model.norm.weight": torch.randn(8),
}


def _transport(tmp_path, name, variants=("full",), timeout_s=20.0):
    cfg = WeightsConfig(transport=CollectiveTransport(bucket_mb=0.0005, backend="gloo", timeout_s=timeout_s))
    return build_transport(cfg, WeightStore(tmp_path / name), list(variants), torch.bfloat16)


def _push(sender, engines, delivery, group: int, act=None):
    """Rank 0's send and every engine's fetch at once, as the driver's push runs them; returns
    the engines' results (or exceptions)."""
    size = len(engines) + 1
    act = act or (lambda engine, seated: engine.fetch(seated, "full", "gen"))
    with ThreadPoolExecutor(size) as pool:
        sent = pool.submit(sender.send, delivery.seated(Seat(group, 0, size)))
        got = [pool.submit(act, e, delivery.seated(Seat(group, r, size)))
               for r, e in enumerate(engines, 1)]
        results = []
        for future in got:
            try:
                results.append(future.result(timeout=60))
            except Exception as exc:  # noqa: BLE001 - the test looks at which
                results.append(exc)
        try:
            sent.result(timeout=60)
        except Exception as exc:  # noqa: BLE001
            results.append(exc)
    return results


def _publish(sender, version):
    named = [(k, (v + version).to(torch.bfloat16)) for k, v in TENSORS.items()]
    return sender.publish(version, now(), iter(named), {}, snapshot=False).result().delivery, dict(named)


def test_a_broadcast_delivers_the_published_tensors_to_every_engine_and_regroups_on_a_new_seating(tmp_path):
    sender = _transport(tmp_path, "sender")
    engines = [_transport(tmp_path, f"e{i}") for i in range(3)]
    delivery, sent = _publish(sender, 1)
    assert delivery.sender is True and delivery.transport == "collective"
    assert delivery.link("full").buckets == ()  # only the manifest travels with the delivery
    assert len(delivery.link("full").packed().buckets) > 1
    for fetched in _push(sender, engines[:2], delivery, group=1):
        assert fetched.fingerprint == delivery.link("full").fingerprint
        assert all(torch.equal(t, sent[name]) for name, t in fetched.tensors)
    # An engine joins: the next push seats three engines in group 2, built on its first use.
    delivery, sent = _publish(sender, 2)
    fetched = _push(sender, engines, delivery, group=2)
    assert [f.version for f in fetched] == [2, 2, 2]
    assert all(torch.equal(dict(f.tensors)["model.norm.weight"], sent["model.norm.weight"]) for f in fetched)
    # One engine holds the version already: it takes part in the broadcasts and keeps nothing.
    declined = _push(sender, engines, delivery, group=2,
                     act=lambda e, d: e.decline(d, "full") if e is engines[0] else e.fetch(d, "full", "gen"))
    assert declined[0] is None and [f.version for f in declined[1:]] == [2, 2]


def test_damaged_and_superseded_versions_are_refused_and_the_group_stays_usable(tmp_path):
    sender = _transport(tmp_path, "sender")
    engine = _transport(tmp_path, "e")
    first, _ = _publish(sender, 1)
    engine.corrupt_bucket = 1
    (result,) = _push(sender, [engine], first, group=1)
    assert isinstance(result, WeightRefused) and "bucket 1: checksum" in str(result)
    for version in (2, 3):
        _publish(sender, version)  # the sender keeps the newest two: version 1 has left
    (result,) = _push(sender, [engine], first, group=1)
    assert isinstance(result, WeightSuperseded)
    newest, sent = _publish(sender, 4)
    (fetched,) = _push(sender, [engine], newest, group=1)
    assert fetched.version == 4 and torch.equal(dict(fetched.tensors)["model.norm.weight"], sent["model.norm.weight"])


def test_a_member_that_never_comes_interrupts_the_push_within_the_timeout(tmp_path):
    sender = _transport(tmp_path, "sender", timeout_s=3.0)
    engine = _transport(tmp_path, "e", timeout_s=3.0)
    delivery, _ = _publish(sender, 1)
    # Seated for two engines, only one comes: the group cannot form, and every member learns so.
    size = 3
    with ThreadPoolExecutor(2) as pool:
        sent = pool.submit(sender.send, delivery.seated(Seat(1, 0, size)))
        got = pool.submit(engine.fetch, delivery.seated(Seat(1, 1, size)), "full", "gen")
        for future in (sent, got):
            with pytest.raises(DeliveryInterrupted):
                future.result(timeout=60)
    # The driver seats the members left in a new group, and the version arrives.
    (fetched,) = _push(sender, [engine], delivery, group=2)
    assert fetched.fingerprint == delivery.link("full").fingerprint


def test_int8_and_full_engines_share_one_group_and_each_keeps_its_variant(tmp_path):
    sender = _transport(tmp_path, "sender", variants=("full", "int8"))
    full, int8 = (_transport(tmp_path, name, variants=("full", "int8")) for name in ("f", "q"))
    delivery, _ = _publish(sender, 1)
    assert set(delivery.variants) == {"full", "int8"}
    results = _push(sender, [full, int8], delivery, group=1,
                    act=lambda e, d: e.fetch(d, "full" if e is full else "int8", "gen"))
    assert results[0].fingerprint == delivery.link("full").fingerprint
    assert results[1].fingerprint == delivery.link("int8").fingerprint
