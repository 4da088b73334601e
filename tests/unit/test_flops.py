"""Training FLOPs both ways (rlhf_cluster/models/flops.py), hand-computed, and the learner's step
metrics that carry them (rlhf_cluster/learner/step_metrics.py)."""

from __future__ import annotations

import pytest
import torch

from rlhf_cluster.learner.base import Passes
from rlhf_cluster.learner.step_metrics import StepMetrics
from rlhf_cluster.models.flops import FlopsShape, StepFlops, batch_flops, flops_of_sums, utilization

SHAPE = FlopsShape(parameters=1000, layers=2, heads=3, head_dim=4)


def test_a_hand_computed_batch():
    # Sequences of 2 and 5 tokens: 7 tokens, squares 4 + 25 = 29.
    got = batch_flops(SHAPE, [2, 5])
    assert got.dense == 6 * 1000 * 7 == 42_000
    assert got.attention == 12 * 2 * 3 * 4 * 29 == 8_352  # per sequence, not the packed row's 7² = 49
    assert got.with_attention == 50_352
    forward = batch_flops(SHAPE, [2, 5], backward=False)
    assert forward == StepFlops(14_000, 14_000 + 2_784)  # a third of each
    assert flops_of_sums(SHAPE, 7, 29) == got
    assert batch_flops(SHAPE, []) == StepFlops(0.0, 0.0)


def test_attention_per_token_is_prime_rls_term():
    """12·L·H·d·s per token of a sequence of s: prime-rl's attention FLOPs per token, causal half
    counted. At Qwen2.5-0.5B's shape and 16k tokens that is 1.43x its 6·N (N = 494M)."""
    s = 16_384
    qwen = FlopsShape(parameters=494_032_768, layers=24, heads=14, head_dim=64)
    per_token = batch_flops(qwen, [s]).attention / s
    assert per_token == 12 * 24 * 14 * 64 * s
    assert per_token / (6 * qwen.parameters) == pytest.approx(1.427, abs=1e-3)


def test_mfu_both_ways():
    assert utilization(StepFlops(4e12, 6e12), 2.0, 1e12) == StepFlops(2.0, 3.0)


def test_the_shape_of_a_hugging_face_config_and_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
        vocab_size=50,
    )  # fmt: skip
    assert FlopsShape.of_config(config, 7) == FlopsShape(7, 3, 4, 16)
    model = Qwen2ForCausalLM(config)
    assert FlopsShape.of_model(model) == FlopsShape(sum(p.numel() for p in model.parameters()), 3, 4, 16)


def _metrics(lengths, rows_of_passes, flops=SHAPE):
    mask = torch.ones(len(lengths), 2)
    passes = Passes(
        micro_metrics=[(rows, {"policy/kl": torch.tensor(0.0)}) for rows in rows_of_passes],
        loss_tensors=[torch.tensor(1.0)],
    )
    metrics = StepMetrics(torch.device("cpu"), mask, flops, torch.tensor(lengths))
    return metrics.read(metrics.device_values(passes, None, {}).tolist())


def test_the_step_metrics_count_every_real_pass(gloo_group):
    """Rows 0-1 in one micro-batch, row 2 (by an index tensor) in another, and two epochs: each
    row's FLOPs counted once per pass it ran in."""
    one_epoch = [slice(0, 2), torch.tensor([2])]
    out = _metrics([2, 5, 3], one_epoch * 2)
    expected = batch_flops(SHAPE, [2, 5, 3] * 2)
    assert out["learner/flops_dense"] == expected.dense == 6 * 1000 * 20
    assert out["learner/flops_with_attention"] == expected.with_attention
    assert out["learner/tokens"] == 6.0 and out["policy/loss"] == 1.0  # the rest as before
    bare = _metrics([2, 5, 3], one_epoch, flops=None)
    assert "learner/flops_dense" not in bare and bare["learner/tokens"] == 6.0
