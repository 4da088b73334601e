"""Routed experts from vLLM itself (`enable_return_routed_experts`, its V2 model runner): on CUDA
an engine of the tiny Qwen3-MoE asked for them (`VLLMEngine(routed_experts=True)`) takes vLLM's
path, every rollout's routing covers its whole sequence from position 0 (prompt rows of cached
blocks included) and names the experts the Hugging Face model routes the same tokens to. On the
CPU (`make test`): the engine takes the capture path (tests/integration/test_engine_routing_capture.py
runs it), vLLM refuses its own there, and the CUDA path's settings and refusals hold."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

SHORT, LONG, N = 4, 2, 3


def _rollouts(model_path: str) -> tuple[list, bool]:
    """The rollouts of short and long prompts (n=3) of an engine asked for routed experts, and
    whether it took vLLM's own path."""
    from rlhf_cluster.config import GenerationConfig, SamplingConfig
    from rlhf_cluster.data.prompts import Prompt
    from rlhf_cluster.generation.engine import VLLMEngine

    cfg = GenerationConfig(gpu_memory_utilization=0.2, sampling=SamplingConfig(n=N, max_new_tokens=24, ignore_eos=True))
    prompts = [Prompt(f"p{a}", f"{a}+{a * 7 % 50}=", "") for a in range(SHORT)]
    rng = torch.Generator().manual_seed(0)
    prompts += [
        Prompt(f"q{i}", "", "", token_ids=tuple(int(t) for t in torch.randint(2, 250, (140,), generator=rng)))
        for i in range(LONG)
    ]
    engine = VLLMEngine(model_path, cfg, routed_experts=True)
    try:
        assert engine.routing is not None
        rollouts, _ = engine.generate(prompts)
        return rollouts, engine.routing.native
    finally:
        engine.close()


@pytest.fixture
def moe_path(model_cache):
    from rlhf_cluster.config import TinyModelConfig
    from rlhf_cluster.models.tiny_model import ensure_tiny_model

    return str(ensure_tiny_model(TinyModelConfig(architecture="qwen3_moe"), model_cache))


def _cpu_half(moe_path: str) -> None:
    from rlhf_cluster.config import GenerationConfig
    from rlhf_cluster.generation.routing_capture import EngineRouting, engine_routing

    routing = engine_routing(moe_path, GenerationConfig())
    assert not routing.native and routing.engine_args() == {}  # the capture path
    assert EngineRouting(8, native=True).engine_args() == {"enable_return_routed_experts": True}
    from vllm.engine.arg_utils import EngineArgs

    # The setting vLLM's CPU engine refuses (why the capture exists); the CUDA engine takes it.
    args = EngineArgs(model=moe_path, enforce_eager=True, **EngineRouting(8, native=True).engine_args())
    with pytest.raises(Exception, match="requires Model Runner V2"):
        args.create_engine_config()


def test_vllm_returns_the_experts_hf_routes_the_same_tokens_to(device, moe_path):
    if device.type == "cpu":
        _cpu_half(moe_path)
        return
    from rlhf_cluster.config import GenerationConfig
    from rlhf_cluster.generation.routing_capture import engine_routing
    from rlhf_cluster.models.modeling import load_causal_lm
    from rlhf_cluster.models.routed_experts import expand_routing
    from rlhf_cluster.models.routing_replay import capture_routing, routing_agreement

    with pytest.raises(ValueError, match="generation.enable_prefix_caching"):
        engine_routing(moe_path, GenerationConfig(enable_prefix_caching=False))
    # vLLM's CUDA engine: the lent GPU machines carry no vLLM wheel (../shared/GPU.md); its CPU half runs in make test
    pytest.importorskip("vllm", reason="vLLM is not installed on this GPU machine")
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        rollouts, native = pool.submit(_rollouts, moe_path).result(timeout=600)
    assert native and len(rollouts) == N * (SHORT + LONG)
    model = load_causal_lm(moe_path, device=device)
    engine_rows, hf_rows = [], []
    for rollout in rollouts:
        routed = rollout.routed_experts
        length = len(rollout.prompt_ids) + len(rollout.response_ids)
        assert routed is not None and routed.start == 0 and routed.tokens == length - 1, rollout.sample_id
        engine_rows.append(torch.from_numpy(expand_routing(routed, rollout.sample_id, length, 2, 2, 8)))
        with torch.no_grad(), capture_routing(model) as seen:
            model(input_ids=torch.tensor([rollout.prompt_ids + rollout.response_ids], device=device))
        hf_rows.append(seen[0][: length - 1].cpu())
    share, metrics = routing_agreement(torch.cat(engine_rows), torch.cat(hf_rows))
    print(f"expert-set agreement vLLM (CUDA) vs HF: {float(share):.4f} over {int(metrics['tokens'])} tokens")
    assert float(share) >= 0.95
