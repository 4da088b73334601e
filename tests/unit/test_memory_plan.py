"""The learner's memory plan (issue 54): the estimate against what one H100 measured, and the
choice of checkpointing and micro-batch tokens that keeps a rank within its share of the device."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_cluster.config import JobConfig
from rlhf_cluster.learner.memory_plan import GIB, ModelShape, estimate, plan_memory

# Qwen2.5 model cards' config.json (the fields the shape reads).
QWEN = {
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
}
H100 = 80 * GIB


def _shape(tmp_path, name: str) -> ModelShape:
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", **QWEN[name]}))
    return ModelShape.of_folder(folder)


def _learner(**learner):
    return JobConfig.model_validate({"learner": learner}).learner


@pytest.mark.parametrize("name", ["0.5b", "1.5b", "7b"])
def test_the_parameter_count_is_the_models_own(tmp_path, name):
    from transformers import AutoModelForCausalLM, Qwen2Config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN[name]))
    # Within the q/k/v biases the shape leaves out.
    assert _shape(tmp_path, name).parameters == pytest.approx(sum(p.numel() for p in model.parameters()), rel=1e-3)


@pytest.mark.parametrize("name,checkpointing,measured_gib", [("0.5b", False, 24.0), ("1.5b", False, 61.5), ("1.5b", True, 24.9)])
def test_the_estimate_is_near_what_one_h100_measured(tmp_path, name, checkpointing, measured_gib):
    """GPU.md, 2026-11-26: gpu_probe_real.py's batch, 10,335 real tokens in one micro-batch."""
    # Measured before the one-rank learner kept its gathered weights from forward to backward.
    got = estimate(_shape(tmp_path, name), 10335, 1, checkpointing).total / GIB
    # Over rather than under: a plan that fits on paper must fit on the device.
    assert measured_gib * 0.95 <= got <= measured_gib * 1.25, got


def test_on_a_gpu_the_plan_keeps_each_shape_within_its_share(tmp_path):
    small = plan_memory(_learner(), _shape(tmp_path, "0.5b"), 1, H100)
    assert (small.checkpointing, small.micro_batch_tokens, small.keep_gathered) == (False, 16384, True)
    gathered = small.estimate.states - estimate(_shape(tmp_path, "0.5b"), 16384).states
    assert gathered == 2 * _shape(tmp_path, "0.5b").parameters  # the bf16 weights each layer keeps gathered
    assert not plan_memory(_learner(), _shape(tmp_path, "0.5b"), 2, H100).keep_gathered  # only at one rank
    # 1.5B at default settings fits half an H100 (issue 54's <= 40 GiB): checkpointing chosen.
    large = plan_memory(_learner(), _shape(tmp_path, "1.5b"), 1, H100)
    assert large.checkpointing and large.estimate.total <= 40 * GIB
    assert estimate(_shape(tmp_path, "1.5b"), 16384, 1, False).total > 40 * GIB
    # More of the device: no checkpointing, a smaller budget first.
    roomy = plan_memory(_learner(memory_fraction=0.9), _shape(tmp_path, "1.5b"), 1, H100)
    assert not roomy.checkpointing and 8192 <= roomy.micro_batch_tokens < 16384, roomy
    # Sharded over 8 ranks, the 7B states fit: the plan sees the ranks.
    assert plan_memory(_learner(), _shape(tmp_path, "7b"), 8, H100).estimate.states < 16 * GIB
    # With LoRA the frozen 7B weights alone (fp32, 28 GiB): it fits one GPU's half without keeping
    # gathered copies (14 GiB more); full fine-tuning does not fit.
    lora = plan_memory(_learner(lora={"rank": 16}), _shape(tmp_path, "7b"), 1, H100)
    assert "fits" in lora.reason and not lora.keep_gathered and lora.estimate.states < 30 * GIB, lora
    assert "does not fit" in plan_memory(_learner(), _shape(tmp_path, "7b"), 1, H100).reason


def test_what_the_config_sets_is_kept(tmp_path):
    shape = _shape(tmp_path, "1.5b")
    fixed = plan_memory(_learner(gradient_checkpointing=False, max_tokens_per_micro_batch=4096), shape, 1, H100)
    assert (fixed.checkpointing, fixed.micro_batch_tokens) == (False, 4096)
    budget_only = plan_memory(_learner(max_tokens_per_micro_batch=4096), shape, 1, H100)
    assert budget_only.micro_batch_tokens == 4096
    # On the CPU: the config's settings, a whole mini-batch by default, no estimate.
    cpu = plan_memory(_learner(), shape, 1, None)
    assert (cpu.checkpointing, cpu.micro_batch_tokens, cpu.estimate, cpu.keep_gathered) == (False, None, None, True)


def test_a_model_that_cannot_fit_gets_the_smallest_plan(tmp_path):
    plan = plan_memory(_learner(), _shape(tmp_path, "7b"), 1, 16 * GIB)
    assert plan.checkpointing and plan.micro_batch_tokens == 1024 and "does not fit" in plan.reason


def test_sequence_parallel_divides_a_ranks_activations_and_scales_the_budgets(tmp_path):
    shape = _shape(tmp_path, "1.5b")
    whole = estimate(shape, 32768, 2, False)
    split = estimate(shape, 32768, 2, False, sequence_parallel=2)
    # Each of the 2 ranks holds half of the micro-batch's slots; the sharded states are the same.
    assert split.activations * 2 == whole.activations and split.states == whole.states
    assert split.tokens == 32768 and "split over 2 ranks" in split.describe()
    # The log-prob path's chunk is this rank's scored tokens where fewer than a chunk.
    assert estimate(shape, 600, sequence_parallel=2).logprobs < estimate(shape, 600).logprobs
    # The plan's budgets are the micro-batch's: N times one rank's (each rank still runs 16k tokens).
    plan = plan_memory(_learner(world_size=2, sequence_parallel=2), shape, 2, H100)
    one = plan_memory(_learner(world_size=2), shape, 2, H100)
    assert plan.micro_batch_tokens == 2 * one.micro_batch_tokens == 32768
    assert plan.estimate.activations == one.estimate.activations  # the same slots per rank


def test_a_row_longer_than_the_budget_is_counted_whole(tmp_path):
    """A row longer than the micro-batch budget goes alone (`token_budget_micro_batches`): one
    H200 ran a 0.5B step at 32k tokens per sequence 14 GiB above its 16k-token plan. The plan now
    counts the job's longest row (`generation.max_model_len`) and checkpoints where that needs it."""
    from rlhf_cluster.config import JobConfig
    from rlhf_cluster.learner.spec import LearnerSpec
    from rlhf_cluster.models.packing import token_budget_micro_batches

    assert token_budget_micro_batches([32768, 100], 16384) == [[0], [1]]  # the long row alone
    shape = _shape(tmp_path, "0.5b")
    short = plan_memory(_learner(), shape, 1, H100, longest=256)
    assert short == plan_memory(_learner(), shape, 1, H100)  # rows under the budget change nothing
    assert not short.checkpointing and short.estimate.tokens == short.micro_batch_tokens == 16384
    # A 32k-token row in half an H100: by the estimate it needs checkpointing, which the plan turns on.
    long = plan_memory(_learner(), shape, 1, H100, longest=32768)
    assert long.micro_batch_tokens == 16384 and long.estimate.tokens == 32768
    assert estimate(shape, 32768, 1, False, keep_gathered=True).total > 40 * GIB
    assert long.checkpointing and long.estimate.total <= 40 * GIB
    # In a whole H200's half (70 GiB) it fits without.
    roomy = plan_memory(_learner(), shape, 1, 141 * GIB, longest=32768)
    assert not roomy.checkpointing and roomy.estimate.tokens == 32768
    spec = LearnerSpec.of_policy(JobConfig.model_validate({"generation": {"max_model_len": 4096}}))
    assert spec.longest_row == 4096


def test_a_mixture_of_experts_counts_every_expert_it_holds(tmp_path):
    """Every expert's weights are held (and sharded, and in the optimizer), though a token runs top_k
    of them: the count is the model's own; the activations hold top_k experts' widths per token."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    fields = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  intermediate_size=1024, moe_intermediate_size=128, num_experts=16, num_experts_per_tok=4,
                  vocab_size=1000, tie_word_embeddings=False, mlp_only_layers=[1])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", **fields}))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**fields))
    shape = ModelShape.of_folder(tmp_path)
    assert shape.parameters == pytest.approx(sum(p.numel() for p in model.parameters()), rel=1e-3)
    assert shape.intermediate == 4 * 128
