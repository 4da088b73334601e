"""An MoE version sent as the learner holds it (transformers 5's stacked experts) reaches an engine
over every transport as the model folder's per-expert tensors, proven by the same fingerprint:
`filesystem` and `direct` (the object store a list) and `collective` (gloo, members on threads)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from rlhf_cluster.config import CollectiveTransport, DirectTransport, FilesystemTransport, WeightsConfig
from rlhf_cluster.weights import WeightStore
from rlhf_cluster.weights.buckets import now
from rlhf_cluster.weights.messages import Seat
from rlhf_cluster.weights.registry import build_transport
from tests.object_store import ObjectStore

E, W, H = 4, 6, 8  # experts, expert width, hidden
LEARNER = {
    "model.embed_tokens.weight": torch.randn(32, H),
    "model.layers.0.self_attn.q_proj.weight": torch.randn(H, H),
    "model.layers.0.mlp.gate.weight": torch.randn(E, H),
    "model.layers.0.mlp.experts.gate_up_proj": torch.randn(E, 2 * W, H),
    "model.layers.0.mlp.experts.down_proj": torch.randn(E, H, W),
    "model.norm.weight": torch.randn(H),
}


def _checkpoint_layout() -> dict[str, torch.Tensor]:
    """What the model folder holds: each expert's projections apart, gate rows before up rows."""
    out = {k: v for k, v in LEARNER.items() if ".experts." not in k}
    for e in range(E):
        prefix = f"model.layers.0.mlp.experts.{e}."
        out[prefix + "gate_proj.weight"] = LEARNER["model.layers.0.mlp.experts.gate_up_proj"][e, :W]
        out[prefix + "up_proj.weight"] = LEARNER["model.layers.0.mlp.experts.gate_up_proj"][e, W:]
        out[prefix + "down_proj.weight"] = LEARNER["model.layers.0.mlp.experts.down_proj"][e]
    return out


def _build(kind, tmp_path, name, objects):
    return build_transport(
        WeightsConfig(transport=kind),
        WeightStore(tmp_path / name),
        ["full"],
        torch.float32,
        put=objects.put,
        get=objects.get,
    )


def _fetch(kind, tmp_path):
    """Publish the learner's tensors and fetch them as one engine: (delivery, what the engine got)."""
    objects = ObjectStore()
    sender = _build(kind, tmp_path, "sender", objects)
    engine = _build(kind, tmp_path, "sender" if kind.type == "filesystem" else "engine", objects)
    delivery = sender.publish(1, now(), iter(LEARNER.items()), {}, snapshot=False).result(timeout=60).delivery
    if kind.type != "collective":
        return delivery, engine.fetch(delivery, "full", "gen0")
    with ThreadPoolExecutor(2) as pool:  # rank 0 broadcasts while the engine receives
        sent = pool.submit(sender.send, delivery.seated(Seat(1, 0, 2)))
        got = pool.submit(engine.fetch, delivery.seated(Seat(1, 1, 2)), "full", "gen0")
        sent.result(timeout=60)
        return delivery, got.result(timeout=60)


@pytest.mark.parametrize(
    "kind",
    [FilesystemTransport(), DirectTransport(bucket_mb=0.001), CollectiveTransport(bucket_mb=0.001, backend="gloo")],
    ids=lambda k: k.type,
)
def test_stacked_experts_arrive_per_expert_and_proven(kind, tmp_path):
    delivery, fetched = _fetch(kind, tmp_path)
    assert fetched.fingerprint == delivery.link("full").fingerprint
    expected = _checkpoint_layout()
    got = dict(fetched.tensors)
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_a_sparse_delta_of_one_expert_moves_that_expert_alone(tmp_path):
    """`delta: sparse` takes its differences over the per-expert tensors: a step that changed one
    expert sends that expert's changed elements, and the engine rebuilds the exact weights."""
    objects = ObjectStore()
    kind = DirectTransport(bucket_mb=0.001, delta="sparse")
    sender, engine = _build(kind, tmp_path, "sender", objects), _build(kind, tmp_path, "engine", objects)
    first = sender.publish(1, now(), iter(LEARNER.items()), {}, snapshot=False).result(timeout=60).delivery
    engine.fetch(first, "full", "gen0")
    step = dict(LEARNER)
    step["model.layers.0.mlp.experts.down_proj"] = LEARNER["model.layers.0.mlp.experts.down_proj"].clone()
    step["model.layers.0.mlp.experts.down_proj"][2, 0, :3] += 1.0
    delivery = sender.publish(2, now(), iter(step.items()), {}, snapshot=False).result(timeout=60).delivery
    assert not delivery.link("full").whole
    fetched = engine.fetch(delivery, "full", "gen0")
    assert fetched.fingerprint == delivery.link("full").fingerprint
    got = dict(fetched.tensors)
    assert torch.equal(
        got["model.layers.0.mlp.experts.2.down_proj.weight"], step["model.layers.0.mlp.experts.down_proj"][2]
    )
    assert torch.equal(
        got["model.layers.0.mlp.experts.1.down_proj.weight"], LEARNER["model.layers.0.mlp.experts.down_proj"][1]
    )
    assert fetched.nbytes < 200  # three changed elements and their indices, not the version
