"""The tiny Qwen3-MoE: built locally under its own cache key, read as an MoE by models.moe, and its
stacked experts split (weights.experts) into exactly the tensors its folder holds."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from rlhf_cluster.config import TinyModelConfig
from rlhf_cluster.models.moe import is_moe, moe_shape
from rlhf_cluster.models.tiny_model import ensure_tiny_model, tiny_model_dir
from rlhf_cluster.weights.experts import checkpoint_state_dict, checkpoint_tensors

MOE = TinyModelConfig(architecture="qwen3_moe", vocab_size=300)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return ensure_tiny_model(MOE, tmp_path_factory.mktemp("models"))


def test_cache_keys_of_moe_and_dense(tmp_path):
    # The dense default keeps the folder name it had before the MoE fields existed.
    assert tiny_model_dir(TinyModelConfig(), tmp_path).name == "tiny-qwen2-fcd9e7378ff8"
    assert tiny_model_dir(TinyModelConfig(num_experts=4), tmp_path) == tiny_model_dir(TinyModelConfig(), tmp_path)
    moe = tiny_model_dir(MOE, tmp_path)
    assert moe.name.startswith("tiny-qwen3_moe-")
    assert tiny_model_dir(MOE.model_copy(update={"num_experts": 4}), tmp_path) != moe


def test_top_k_above_experts_is_refused():
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        TinyModelConfig(architecture="qwen3_moe", num_experts=2, num_experts_per_tok=3)


def test_folder_is_a_qwen3_moe(moe_dir):
    assert is_moe(moe_dir) and moe_shape(moe_dir) == (8, 2, 2)
    assert not is_moe({"num_hidden_layers": 2})
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32)
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and model.config.head_dim == 32
    logits = model(input_ids=torch.tensor([[3, 4, 5, 6]])).logits
    assert torch.isfinite(logits).all()


def test_split_experts_are_the_folders_tensors(moe_dir):
    """What a version leaves the learner as: the folder's names, shapes and bytes exactly."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32)
    held = model.state_dict()
    assert any(name.endswith("mlp.experts.gate_up_proj") for name in held)  # transformers 5 stacks them
    folder = load_file(str(moe_dir / "model.safetensors"))
    split = checkpoint_state_dict(held)
    assert sorted(split) == sorted(folder)
    for name, tensor in folder.items():
        assert torch.equal(split[name], tensor), name
    # Each expert tensor is its own (a store writes them apart); dense tensors pass as they are.
    gate = split["model.layers.0.mlp.experts.3.gate_proj.weight"]
    assert gate.untyped_storage().data_ptr() != held["model.layers.0.mlp.experts.gate_up_proj"].data_ptr()
    dense = {"model.norm.weight": torch.ones(4)}
    assert checkpoint_state_dict(dense) is dense
    assert list(checkpoint_tensors(dense.items())) == list(dense.items())


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_split_experts_match_the_folder_of_other_families(family, tmp_path):
    """Qwen2-MoE (beside its shared expert) and OLMoE keep their experts in the same folder layout."""
    from transformers import OlmoeConfig, OlmoeForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    shape = dict(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    if family == "qwen2_moe":
        config = Qwen2MoeConfig(
            **shape, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64
        )
        model = Qwen2MoeForCausalLM(config)
    else:
        model = OlmoeForCausalLM(OlmoeConfig(**shape, intermediate_size=32, num_experts=4, num_experts_per_tok=2))
    model.save_pretrained(tmp_path)
    folder = load_file(str(tmp_path / "model.safetensors"))
    split = checkpoint_state_dict(model.state_dict())
    assert sorted(split) == sorted(folder)
    assert all(torch.equal(split[name], tensor) for name, tensor in folder.items())
