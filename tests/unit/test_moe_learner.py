"""The FSDP2 learner trains the tiny Qwen3-MoE on the CPU: each decoder layer (attention, router and
stacked experts) sharded on its own, a step changes the experts and the router, a checkpoint
restores the same state, and the version it sends has the engine checkpoint's tensor layout."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributed.tensor import DTensor

from rlhf_cluster.config import JobConfig, TinyModelConfig
from rlhf_cluster.learner.fsdp2 import FSDP2Learner
from rlhf_cluster.learner.spec import LearnerSpec
from rlhf_cluster.models.quantization import check_push, checkpoint_spec
from rlhf_cluster.models.tiny_model import ensure_tiny_model
from rlhf_cluster.weights.experts import checkpoint_tensors
from tests.batches import ragged_batch

EXPERTS = "model.layers.0.mlp.experts.gate_up_proj"
ROUTER = "model.layers.1.mlp.gate.weight"


@pytest.fixture(scope="module")
def moe_path(model_cache) -> str:
    return str(ensure_tiny_model(TinyModelConfig(architecture="qwen3_moe"), model_cache))


def _learner(path: str) -> FSDP2Learner:
    cfg = JobConfig.model_validate({"learner": {"world_size": 1, "lr": 1e-2}})
    return FSDP2Learner(LearnerSpec.of_policy(cfg), path)


def test_fsdp2_trains_checkpoints_and_sends_an_moe(gloo_group, moe_path, tmp_path):
    learner = _learner(moe_path)
    layer = learner.model.model.layers[0]
    assert type(layer).__name__ == "FSDPQwen3MoeDecoderLayer"  # the layer is its own FSDP unit
    assert isinstance(layer.mlp.experts.gate_up_proj, DTensor) and isinstance(layer.mlp.gate.weight, DTensor)
    before = learner.full_state_dict()
    batch = ragged_batch([(3 + i % 3, 2 + (5 * i) % 7) for i in range(6)], seed=0)
    for _ in range(2):
        metrics = learner.train_step(batch, kl_coef=0.0)
        assert math.isfinite(metrics["policy/loss"]) and metrics["learner/skipped_updates"] == 0, metrics
        assert not any(k.startswith("routing/") for k in metrics)  # no routed experts: no probe, no extra forwards
    after = learner.full_state_dict()
    for name in (EXPERTS, ROUTER, "model.layers.1.self_attn.q_proj.weight"):
        assert not torch.equal(before[name], after[name]), f"{name} did not train"

    # Checkpoint round trip: a fresh learner restored from it holds the trained state exactly.
    (tmp_path / "ckpt" / "rng").mkdir(parents=True)  # the run's checkpoint writer makes its folders
    future, digest = learner.save_checkpoint(tmp_path / "ckpt")
    future.result()
    restored = _learner(moe_path)
    assert restored.load_checkpoint(tmp_path / "ckpt") == digest
    again = restored.full_state_dict()
    assert all(torch.equal(again[name], tensor) for name, tensor in after.items())

    # The version leaves in the engine checkpoint's layout (per-expert tensors), which the push check takes.
    sent = list(checkpoint_tensors(learner.named_engine_tensors(torch.float32)))
    check_push(checkpoint_spec(moe_path), sent)
    sent_by_name = dict(sent)
    gate, up = after[EXPERTS][5].chunk(2, dim=0)
    assert torch.equal(sent_by_name["model.layers.0.mlp.experts.5.gate_proj.weight"], gate)
    assert torch.equal(sent_by_name["model.layers.0.mlp.experts.5.up_proj.weight"], up)
