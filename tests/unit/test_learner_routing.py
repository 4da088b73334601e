"""The learner replays the engine's experts in its training forwards (`algorithm.routing_replay:
rollout`) and reports each step's routing telemetry, on the project's tiny Qwen3-MoE trained by the
FSDP2 learner: the samples' routings and rollout log-probs come from an "engine", the same weights
with a perturbed router (other kernels and numerics), so the two sides route some tokens apart."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhf_cluster.config import JobConfig, TinyModelConfig
from rlhf_cluster.experience.records import ScoredSample, TrainBatch, pad_sequences
from rlhf_cluster.learner.base import LearnerSpec
from rlhf_cluster.learner.fsdp2 import FSDP2Learner
from rlhf_cluster.models.modeling import load_causal_lm, response_logprobs
from rlhf_cluster.models.routed_experts import compact_routing
from rlhf_cluster.models.routing_replay import capture_routing, routing_shape
from rlhf_cluster.models.tiny_model import ensure_tiny_model

LENGTHS = [(5, 9), (3, 12), (6, 7), (4, 11)]


@pytest.fixture(scope="module")
def moe_path(model_cache) -> str:
    return str(ensure_tiny_model(TinyModelConfig(architecture="qwen3_moe"), model_cache))


def _engine_samples(path: str, noise: float = 0.3) -> list[ScoredSample]:
    """Samples as an engine would return them: its log-probs and routing of each sequence."""
    engine = load_causal_lm(path).float().eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in engine.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.add_(torch.randn(p.shape, generator=g) * p.std() * noise)
    rng = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (p,), generator=rng).tolist() for p, _ in LENGTHS]
    responses = [torch.randint(3, 200, (r,), generator=rng).tolist() for _, r in LENGTHS]
    ids, mask, prompt_lengths, T = pad_sequences(prompts, responses)
    shape = routing_shape(engine)
    with torch.no_grad(), capture_routing(engine) as seen:
        logp, _ = response_logprobs(engine, ids, mask, prompt_lengths, T, packed=False)
    routing = seen[0].view(len(LENGTHS), ids.shape[1], shape.layers, shape.top_k)
    samples = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        samples.append(
            ScoredSample(
                sample_id=f"s{i}", prompt_id=f"p{i}", group_id="g", prompt_ids=p, response_ids=r,
                rollout_logprobs=logp[i, : len(r)].tolist(), policy_version=0, finish_reason="length",
                reward=0.0, reward_components={}, ref_logprobs=logp[i, : len(r)].tolist(),
                advantages=[0.5 - (i % 2)] * len(r),
                routed_experts=compact_routing(routing[i, : n - 1], shape.num_experts),
            )
        )  # fmt: skip
    return samples


def _step(path: str, replay: str, packing: bool, samples: list[ScoredSample], backend: str = "fsdp2") -> dict:
    cfg = JobConfig.model_validate(
        {
            "algorithm": {"routing_replay": replay},
            "learner": {"backend": backend, "world_size": 1, "lr": 1e-3, "sequence_packing": packing},
        }
    )
    if backend == "deepspeed":
        from rlhf_cluster.learner.deepspeed import DeepSpeedLearner

        learner = DeepSpeedLearner(LearnerSpec.of_policy(cfg), path)
    else:
        learner = FSDP2Learner(LearnerSpec.of_policy(cfg), path)
    return learner.train_step(TrainBatch.from_samples(copy.deepcopy(samples)), kl_coef=0.0)


@pytest.mark.parametrize("packing,backend", [(False, "fsdp2"), (True, "fsdp2"), (True, "deepspeed")])
def test_the_training_forward_replays_the_engines_experts(gloo_group, moe_path, packing, backend):
    samples = _engine_samples(moe_path)
    replayed = _step(moe_path, "rollout", packing, samples, backend)
    own = _step(moe_path, "none", packing, samples, backend)
    for metrics in (replayed, own):
        # The engine and the learner route some tokens apart; the probe measures both ways on one micro-batch.
        assert 0.5 < metrics["routing/expert_set_agreement"] < 0.99, metrics
        assert metrics["routing/mismatch_k3_with_replay"] < 0.5 * metrics["routing/mismatch_k3_without_replay"]
        assert metrics["routing/load_max_over_mean"] >= 1.0
    # One micro-batch of every row: the step's own mismatch (its training forward against the rollout
    # log-probs) is the probe's replayed one with replay, its unreplayed one without.
    assert replayed["correction/mismatch_k3"] == pytest.approx(replayed["routing/mismatch_k3_with_replay"], rel=1e-3)
    assert own["correction/mismatch_k3"] == pytest.approx(own["routing/mismatch_k3_without_replay"], rel=1e-3)
    assert replayed["correction/mismatch_k3"] < 0.5 * own["correction/mismatch_k3"]


def test_a_dense_policy_has_no_routing_and_replay_refuses_it(gloo_group, tiny_model_path):
    from tests.batches import ragged_batch

    batch = ragged_batch([(3, 4), (2, 5)])
    cfg = JobConfig.model_validate({"learner": {"world_size": 1}})
    metrics = FSDP2Learner(LearnerSpec.of_policy(cfg), tiny_model_path).train_step(batch)
    assert not any(k.startswith("routing/") for k in metrics)
    replay = JobConfig.model_validate({"learner": {"world_size": 1}, "algorithm": {"routing_replay": "rollout"}})
    with pytest.raises(ValueError, match="algorithm.routing_replay=rollout: the policy .* has no MoE layers"):
        FSDP2Learner(LearnerSpec.of_policy(replay), tiny_model_path).train_step(batch)


def test_replay_refuses_a_sample_without_routed_experts(gloo_group, moe_path):
    samples = _engine_samples(moe_path)
    samples[2].routed_experts = None
    with pytest.raises(ValueError, match=r"routing_replay=rollout: samples \['s2'\] carry no routed experts"):
        _step(moe_path, "rollout", True, samples)
    assert "routing/expert_set_agreement" in _step(moe_path, "none", True, samples)  # telemetry takes what there is


def test_a_sequence_groups_joined_shares_keep_each_rows_routing(moe_path):
    from rlhf_cluster.learner.sequence_groups import concat_batches

    samples = _engine_samples(moe_path)
    bare = copy.deepcopy(samples[2:])
    for s in bare:
        s.routed_experts = None
    routed, without = TrainBatch.from_samples(samples[:2]), TrainBatch.from_samples(bare)
    assert without.routings is None
    orders = (([routed, without], samples[:2] + [None, None]), ([without, routed], [None, None] + samples[:2]))
    for shares, expected in orders:
        joined = concat_batches(shares)
        assert joined.routings == [None if s is None else s.routed_experts for s in expected]
    assert concat_batches([without, without]).routings is None
