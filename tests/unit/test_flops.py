"""Training FLOPs both ways (rlhf_cluster/models/flops.py), hand-computed, a mixture of experts by
its active parameters, and the learner's step metrics that carry them
(rlhf_cluster/learner/step_metrics.py)."""

from __future__ import annotations

import pytest
import torch

from rlhf_cluster.learner.base import Passes
from rlhf_cluster.learner.step_metrics import StepMetrics
from rlhf_cluster.models.flops import (
    FlopsShape,
    StepFlops,
    active_parameters,
    batch_flops,
    flops_of_sums,
    parameter_counts,
    utilization,
)
from rlhf_cluster.models.moe import MoeShape

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
    total = sum(p.numel() for p in model.parameters())
    assert FlopsShape.of_model(model) == FlopsShape(total, 3, 4, 16)  # a dense model: every parameter
    assert parameter_counts(model) == (total, total)


def test_the_tiny_moe_counts_its_active_parameters(model_cache):
    """The tiny Qwen3-MoE (8 experts, top-2, stacked `gate_up_proj` [E, 2I, H] and `down_proj`):
    per token the attention, norms, router and 2 of 8 experts, by hand; 6·active·tokens dense."""
    from transformers import AutoModelForCausalLM

    from rlhf_cluster.config import TinyModelConfig
    from rlhf_cluster.models.tiny_model import ensure_tiny_model

    cfg = TinyModelConfig(architecture="qwen3_moe")
    model = AutoModelForCausalLM.from_pretrained(ensure_tiny_model(cfg, model_cache), dtype=torch.float32)
    c = model.config
    h, d, v, e, k, i = (
        c.hidden_size,
        c.head_dim,
        c.vocab_size,
        c.num_local_experts,
        c.num_experts_per_tok,
        c.moe_intermediate_size,
    )
    assert (e, k) == (8, 2) and not c.tie_word_embeddings
    attention = h * c.num_attention_heads * d * 2 + h * c.num_key_value_heads * d * 2 + 2 * d  # q, o, k, v, q/k norms
    expert = 3 * h * i  # gate, up, down
    per_layer = attention + 2 * h + e * h  # + the layer's two norms + the router
    active = v * h * 2 + h + c.num_hidden_layers * (per_layer + k * expert)  # embedding, output, final norm
    total = v * h * 2 + h + c.num_hidden_layers * (per_layer + e * expert)
    assert parameter_counts(model) == (total, active) == (sum(p.numel() for p in model.parameters()), active)
    assert active < total / 2  # before: every expert counted, 2.4x the products a step runs
    shape = FlopsShape.of_model(model)
    assert shape == FlopsShape(active, c.num_hidden_layers, c.num_attention_heads, d)
    assert batch_flops(shape, [3, 5]).dense == 6 * active * 8


def test_a_shared_expert_and_the_router_count_whole():
    """Qwen2-MoE: a shared expert (and its sigmoid gate) that every token runs, beside 4 routed
    experts of which each token runs 2."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, vocab_size=40,
        intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4,
        num_experts_per_tok=2, tie_word_embeddings=True,
    )  # fmt: skip
    with torch.device("meta"):
        model = Qwen2MoeForCausalLM(config)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    routed = sum(n for name, n in sizes.items() if ".mlp.experts." in name)
    assert routed == 2 * 4 * 3 * 32 * 16 and any(".shared_expert." in name for name in sizes)
    total, active = parameter_counts(model)
    assert total == sum(sizes.values()) and active == total - routed // 2


def test_which_tensors_are_routed_experts():
    moe = MoeShape(num_experts=4, top_k=1, layers=(0,))
    sizes = [
        ("model.layers.0.mlp.experts.0.w1.weight", 40),  # one module per expert (Mixtral before transformers 5)
        ("model.layers.0.mlp.experts.1.w1.weight", 40),
        ("model.layers.0.mlp.experts.2.w1.weight", 40),
        ("model.layers.0.mlp.experts.3.w1.weight", 40),
        ("model.layers.0.mlp.shared_experts.gate_proj.weight", 10),  # DeepSeek's: every token runs it
        ("model.layers.0.mlp.gate.weight", 4),  # the router
        ("model.embed_tokens.weight", 100),
    ]
    assert active_parameters(sizes, moe) == (274, 274 - 160 + 40)
    assert active_parameters(sizes, None) == (274, 274)  # a dense config counts every tensor


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
