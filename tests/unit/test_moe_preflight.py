"""Preflight refuses an MoE folder vLLM's CPU engines cannot serve, naming the settings; the tiny
MoE passes, and so does the same folder for engines on GPUs."""

from __future__ import annotations

import json
import shutil

import pytest

from rlhf_cluster.config import ConfigError, JobConfig, TinyModelConfig
from rlhf_cluster.job.preflight import preflight
from rlhf_cluster.models.moe import cpu_engine_refusal, head_dim
from rlhf_cluster.models.tiny_model import ensure_tiny_model


@pytest.fixture(scope="module")
def moe_path(model_cache):
    return ensure_tiny_model(TinyModelConfig(architecture="qwen3_moe"), model_cache)


def _job(path, gpus: float = 0) -> JobConfig:
    return JobConfig.model_validate({"model": {"path": str(path)}, "generation": {"resources": {"num_gpus": gpus}}})


def test_an_moe_with_head_dim_16_is_refused_on_cpu_engines(moe_path, tmp_path):
    assert cpu_engine_refusal(moe_path) is None and head_dim(moe_path) == 32
    preflight(_job(moe_path))
    narrow = tmp_path / "narrow"
    shutil.copytree(moe_path, narrow)
    config = json.loads((narrow / "config.json").read_text())
    (narrow / "config.json").write_text(json.dumps({**config, "head_dim": 16}))
    with pytest.raises(ConfigError) as info:
        preflight(_job(narrow))
    message = str(info.value)
    assert "model.path" in message and "head_dim 16" in message and "generation.resources.num_gpus=0" in message
    preflight(_job(narrow, gpus=1))  # GPU engines run other attention kernels


def test_int8_rollouts_of_an_moe_are_refused_on_cpu_engines(moe_path):
    int8 = JobConfig.model_validate({"model": {"path": str(moe_path)}, "generation": {"quantization": "int8"}})
    with pytest.raises(ConfigError, match="generation.quantization=int8: vLLM's CPU build has no int8 MoE kernel"):
        preflight(int8)


def test_refusals_from_the_config_alone():
    assert head_dim({"hidden_size": 64, "num_attention_heads": 4}) == 16
    dense = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4}
    assert cpu_engine_refusal(dense) is None  # a dense model is not this rule's
    moe = {**dense, "num_experts": 4, "num_experts_per_tok": 2}
    assert "head_dim 16" in cpu_engine_refusal(moe)
    assert "6 experts of 4" in cpu_engine_refusal({**moe, "num_experts_per_tok": 6, "head_dim": 32})
    assert cpu_engine_refusal({**moe, "head_dim": 64}) is None


def test_routing_replay_is_refused_for_a_dense_policy_and_for_episodes(moe_path, tiny_model_path):
    replay = {"algorithm": {"routing_replay": "rollout"}}
    with pytest.raises(ConfigError, match=r"routing_replay=rollout: the policy is dense \(model.tiny.architecture=qwen2"):
        preflight(JobConfig.model_validate(replay))
    dense_folder = JobConfig.model_validate({**replay, "model": {"path": str(tiny_model_path)}})
    with pytest.raises(ConfigError, match=rf"model.path {tiny_model_path} is a dense model"):
        preflight(dense_folder)
    preflight(JobConfig.model_validate({**replay, "model": {"path": str(moe_path)}}))
    preflight(JobConfig.model_validate({**replay, "model": {"tiny": {"architecture": "qwen3_moe"}}}), files=False)
    episodes = {**replay, "model": {"path": str(moe_path)}, "generation": {"environment": "tools"}}
    with pytest.raises(ConfigError, match="generation.environment is set, and the engine returns no routed experts"):
        preflight(JobConfig.model_validate(episodes), files=False)
