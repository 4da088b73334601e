"""models.moe reads an MoE's routing shape from its config under each family's key names."""

from __future__ import annotations

import json

import pytest

from rlhf_cluster.models.moe import MoeShape, is_moe, moe_info, moe_shape

QWEN3_MOE = {"num_hidden_layers": 4, "num_local_experts": 8, "num_experts_per_tok": 2, "decoder_sparse_step": 1}


def test_dense_configs_are_not_moe() -> None:
    assert not is_moe({"num_hidden_layers": 2, "hidden_size": 64})
    assert not is_moe({"num_hidden_layers": 2, "num_experts": 1, "num_experts_per_tok": 1})
    with pytest.raises(ValueError, match="dense"):
        moe_shape({"num_hidden_layers": 2})


def test_qwen3_moe_as_transformers_writes_it(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_MOE))
    assert is_moe(tmp_path) and is_moe(tmp_path / "config.json") and is_moe(str(tmp_path))
    assert moe_shape(tmp_path) == (8, 2, 4)


def test_layer_rules_of_each_family() -> None:
    assert moe_info({**QWEN3_MOE, "mlp_only_layers": [0, 3]}) == MoeShape(8, 2, (1, 2))
    assert moe_info({**QWEN3_MOE, "decoder_sparse_step": 2}).layers == (1, 3)
    deepseek = {"num_hidden_layers": 4, "n_routed_experts": 16, "num_experts_per_tok": 4, "first_k_dense_replace": 1}
    assert moe_shape(deepseek) == (16, 4, 3)
    mixtral = {"num_hidden_layers": 2, "num_local_experts": 8, "num_experts_per_tok": 2}
    assert moe_shape(mixtral) == (8, 2, 2)


def test_nested_text_config_and_objects() -> None:
    vlm = {"text_config": {**QWEN3_MOE, "num_experts": 16}}
    assert moe_shape(vlm) == (16, 2, 4)

    class Model:
        config = type("Cfg", (), {"to_dict": lambda self: dict(QWEN3_MOE)})()

    assert moe_shape(Model()) == (8, 2, 4)


def test_experts_without_top_k_are_refused() -> None:
    with pytest.raises(ValueError, match="experts per token"):
        is_moe({"num_hidden_layers": 2, "num_experts": 8})
