"""What a learner step dispatches (issue 54: each aten operation is at least one kernel launch on a
GPU; 3,987 launches and 1,920 copies made a 0.5B step launch-bound on an H100). Counted on the CPU
(`telemetry.op_counts`), where the dispatch is the same: the decoder layers run once per
micro-batch, each within an operation budget, and a bf16 step casts each layer's weights once per
micro-batch, not again for the backward."""

from __future__ import annotations

import dataclasses

import pytest

from rlhf_cluster.config import JobConfig
from rlhf_cluster.learner.base import LearnerSpec
from rlhf_cluster.learner.fsdp2 import FSDP2Learner
from rlhf_cluster.telemetry.op_counts import count_ops
from tests.batches import ragged_batch

# Forward operations per decoder layer per micro-batch measured at this shape when the budget was
# set (2026-11-26: 81.5 fp32, 85.5 bf16), with a margin: a change that adds launches to every layer
# must raise it knowingly.
FORWARD_OPS_PER_LAYER = 92


def _step_counts(tiny_model_path, precision: str, keep_gathered: bool, monkeypatch):
    cfg = JobConfig.model_validate({"learner": {"world_size": 1, "mixed_precision": precision,
                                                "max_tokens_per_micro_batch": 30}})
    if not keep_gathered:  # the plan as it is, but resharding after the forward
        from rlhf_cluster.learner import memory_plan

        plan = memory_plan.plan_memory
        monkeypatch.setattr(memory_plan, "plan_memory", lambda *a: dataclasses.replace(plan(*a), keep_gathered=False))
    learner = FSDP2Learner(LearnerSpec.of_policy(cfg), tiny_model_path)
    batch = ragged_batch([(3 + i % 3, 2 + (5 * i) % 7) for i in range(6)], seed=0)
    learner.train_step(batch, kl_coef=0.0)  # lazy initialisation
    layers = learner.model.model.layers
    with count_ops(layers) as counts:
        learner.train_step(batch, kl_coef=0.0)
    micro_batches = len(learner._micro_batches(batch, 0, len(batch.input_ids)))
    return counts, len(layers), micro_batches


@pytest.mark.parametrize("precision", ["none", "bf16"])
def test_each_layer_runs_once_per_micro_batch_within_its_budget(gloo_group, tiny_model_path, precision, monkeypatch):
    counts, layers, micro_batches = _step_counts(tiny_model_path, precision, True, monkeypatch)
    assert micro_batches > 1
    assert counts.layer_calls == layers * micro_batches  # no second forward (a separate pi_prox pass)
    assert counts.per_layer_call <= FORWARD_OPS_PER_LAYER, counts.as_dict()


def test_a_one_rank_bf16_step_casts_each_layer_once_per_micro_batch(gloo_group, tiny_model_path, monkeypatch):
    kept, _, _ = _step_counts(tiny_model_path, "bf16", True, monkeypatch)
    resharded, _, _ = _step_counts(tiny_model_path, "bf16", False, monkeypatch)
    # Resharding after the forward gathers and casts every layer's weights again for its backward.
    assert kept.copies < resharded.copies * 0.7, (kept.as_dict(), resharded.as_dict())
    assert kept.total < resharded.total
