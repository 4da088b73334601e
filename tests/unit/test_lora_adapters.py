"""An engine's adapter slot (pure logic, no vLLM engine): the layout a push must have, the peft
folder each version is written as, the slot's rank in vLLM's sizes, and the config's refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rlhf_cluster.config import ConfigError, JobConfig, LoraConfig, load_config
from rlhf_cluster.generation.lora_adapters import AdapterSlot
from rlhf_cluster.models.quantization import WeightSpecError
from rlhf_cluster.job.preflight import preflight

BASE = {
    "model.embed_tokens.weight": (torch.float32, (512, 64)),
    "model.layers.0.self_attn.q_proj.weight": (torch.float32, (64, 64)),
    "model.layers.0.self_attn.k_proj.weight": (torch.float32, (32, 64)),
    "model.layers.0.mlp.down_proj.weight": (torch.float32, (64, 128)),
    "model.layers.0.input_layernorm.weight": (torch.float32, (64,)),
    "model.norm.weight": (torch.float32, (64,)),
}
P = "base_model.model.model.layers.0"


def test_the_slot_accepts_exactly_the_adapters_of_the_targeted_layers(tmp_path):
    slot = AdapterSlot(LoraConfig(rank=4, target_modules=["q_proj", "k_proj", "down_proj"]), BASE, "gen0")
    try:
        assert slot.spec == {
            f"{P}.self_attn.q_proj.lora_A.weight": (torch.float32, (4, 64)),
            f"{P}.self_attn.q_proj.lora_B.weight": (torch.float32, (64, 4)),
            f"{P}.self_attn.k_proj.lora_A.weight": (torch.float32, (4, 64)),
            f"{P}.self_attn.k_proj.lora_B.weight": (torch.float32, (32, 4)),
            f"{P}.mlp.down_proj.lora_A.weight": (torch.float32, (4, 128)),
            f"{P}.mlp.down_proj.lora_B.weight": (torch.float32, (64, 4)),
        }
        assert slot.engine_args() == {"enable_lora": True, "max_lora_rank": 8, "max_loras": 1}
        assert slot.request is None  # no adapter yet: requests run on the base model
        weights = [(n, torch.randn(*shape)) for n, (_, shape) in slot.spec.items()]
        load = slot.write(3, weights)
        assert load.load_inplace and load.lora_int_id == 1
        written = load_file(f"{load.lora_path}/adapter_model.safetensors")
        assert all(torch.equal(written[n], t) for n, t in weights)
        config = json.loads(open(f"{load.lora_path}/adapter_config.json").read())
        assert config["r"] == 4 and config["lora_alpha"] == 16.0 and config["peft_type"] == "LORA"
        slot.loaded(load)
        assert slot.request.lora_path == load.lora_path and not slot.request.load_inplace
        # A push of another layout (a merged weight, a wrong rank) is refused before vLLM sees it.
        with pytest.raises(WeightSpecError, match="not a tensor of this engine"):
            slot.write(4, [*weights, ("model.layers.0.self_attn.q_proj.weight", torch.randn(64, 64))])
        with pytest.raises(WeightSpecError, match=r"expected float32 \[4, 64\]"):
            slot.write(4, [(n, torch.randn(8, 64) if n.endswith("q_proj.lora_A.weight") else t) for n, t in weights])
    finally:
        slot.close()
    assert not slot.root.exists()


def test_adapters_are_refused_where_engines_cannot_take_them():
    assert JobConfig.model_validate({"learner": {"lora": {"rank": 4}}}).learner.lora.adapters_only
    assert not JobConfig.model_validate({"learner": {"lora": {"rank": 4, "sync": "merged"}}}).learner.lora.adapters_only
    int8 = load_config(None, ["learner.lora.rank=4", "algorithm.kl.placement=loss", "generation.quantization=int8"])
    with pytest.raises(ConfigError, match=r"learner\.lora\.sync: adapters with int8 rollouts"):
        preflight(int8, files=False)
    merged = load_config(None, ["learner.lora.rank=4", "learner.lora.sync=merged", "algorithm.kl.placement=loss",
                                "generation.quantization=int8"])
    assert not any("learner.lora" in w for w in preflight(merged, files=False))
