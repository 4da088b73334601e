"""The CPU routing capture on a real engine: the tiny Qwen3-MoE's rollouts carry the experts vLLM
routed each token to, and they are the experts the Hugging Face model routes the same sequence to.
Several groups run at once (n=3, so steps batch many requests, prefill and decode together); the
long prompts span a KV block, so a group's later responses take it from the prefix cache and are
given the first response's rows there. If one request's rows were filed under another's, the
agreement would fall to chance (measured 0.05 with the step's rows reversed). Then the issue's
proof on the real engine's rollouts: a learner whose routers moved since (routing 46% of (token,
layer) pairs elsewhere) is 11x closer to the engine's log-probs of the sampled tokens with the
engine's experts replayed than routing itself (7.0e-3 -> 6.2e-4 mean |difference|, 2026-11-28).

The engine runs in a child process: vLLM sets up a torch.distributed group in its process, which
would outlive the test here. No Ray."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest

SHORT, LONG, N = 6, 3, 3


def _generate(model_path: str) -> tuple[list, int, list[int], int]:
    """The rollouts of all prompts (n=3) with routing capture; the requests left in the capture;
    the routings' starts before a group's prompt rows were shared; vLLM's KV block size."""
    import torch

    from rlhf_cluster.config import GenerationConfig, SamplingConfig
    from rlhf_cluster.data.prompts import Prompt
    from rlhf_cluster.generation import routing_capture
    from rlhf_cluster.generation.engine import VLLMEngine

    cfg = GenerationConfig(sampling=SamplingConfig(n=N, max_new_tokens=24, ignore_eos=True))
    prompts = [Prompt(f"p{a}", f"{a}+{a * 7 % 50}=", "") for a in range(SHORT)]
    rng = torch.Generator().manual_seed(0)
    prompts += [
        Prompt(f"q{i}", "", "", token_ids=tuple(int(t) for t in torch.randint(2, 250, (140,), generator=rng)))
        for i in range(LONG)
    ]
    raw_starts: list[int] = []
    share = routing_capture.share_prompt_routing

    def spy(routings, prompt_len):
        raw_starts.extend(r[1] for r in routings if r is not None)
        return share(routings, prompt_len)

    routing_capture.share_prompt_routing = spy
    engine = VLLMEngine(model_path, cfg, routed_experts=True)
    try:
        rollouts, _ = engine.generate(prompts)
        assert engine.routing is not None and engine.routing.book is not None
        leftover = len(engine.routing.book) + len(engine.routing._finished)
        return rollouts, leftover, raw_starts, engine.engine.vllm_config.cache_config.block_size
    finally:
        engine.close()


@pytest.fixture(scope="module")
def moe_path(model_cache):
    from rlhf_cluster.config import TinyModelConfig
    from rlhf_cluster.models.tiny_model import ensure_tiny_model

    return str(ensure_tiny_model(TinyModelConfig(architecture="qwen3_moe"), model_cache))


def test_rollouts_carry_the_experts_hf_routes_the_same_tokens_to(moe_path):
    import torch

    from rlhf_cluster.models.modeling import load_causal_lm
    from rlhf_cluster.models.routed_experts import expand_routing
    from rlhf_cluster.models.routing_replay import capture_routing, routing_agreement

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        rollouts, leftover, raw_starts, block_size = pool.submit(_generate, moe_path).result(timeout=300)
    assert len(rollouts) == N * (SHORT + LONG) and leftover == 0
    # A later response of a long prompt's group ran from the first block it did not find cached.
    assert sorted(raw_starts) == [0] * (N * SHORT + LONG) + [block_size] * (N - 1) * LONG, raw_starts
    model = load_causal_lm(moe_path)
    engine_rows, hf_rows, starts = [], [], []
    for rollout in rollouts:
        routed = rollout.routed_experts
        assert routed is not None, rollout.sample_id
        length = len(rollout.prompt_ids) + len(rollout.response_ids)
        assert routed.tokens == length - 1 - routed.start and (routed.layers, routed.top_k) == (2, 2)
        starts.append(routed.start)
        engine_rows.append(torch.from_numpy(expand_routing(routed, rollout.sample_id, length, 2, 2, 8)))
        with torch.no_grad(), capture_routing(model) as seen:
            model(input_ids=torch.tensor([rollout.prompt_ids + rollout.response_ids]))
        hf_rows.append(seen[0][routed.start : length - 1])
    # ... and was given the first response's rows of that block.
    assert starts == [0] * len(rollouts), starts
    share, metrics = routing_agreement(torch.cat(engine_rows), torch.cat(hf_rows))
    per_sample = [float(routing_agreement(e, h)[0]) for e, h in zip(engine_rows, hf_rows)]
    print(
        f"expert-set agreement engine vs HF: {float(share):.4f} over {int(metrics['tokens'])} tokens "
        f"(worst sample {min(per_sample):.4f})"
    )
    assert float(share) >= 0.95 and min(per_sample) >= 0.8, (float(share), per_sample)

    # Replay with the real engine's routing: a learner whose routers moved since the engine sampled
    # (as a training step moves them) routes some tokens elsewhere; replaying the engine's experts
    # brings its log-probs of the sampled tokens closer to the engine's.
    from rlhf_cluster.models.modeling import response_logprobs
    from rlhf_cluster.models.routing_replay import RoutingReplay, padded_layout, routing_shape

    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.5)
    gaps: dict[str, list[torch.Tensor]] = {"own": [], "replayed": []}
    agreement = []
    replay = RoutingReplay(model)
    for rollout in rollouts:
        ids = torch.tensor([rollout.prompt_ids + rollout.response_ids])
        args = (ids, torch.ones_like(ids), torch.tensor([len(rollout.prompt_ids)]), len(rollout.response_ids))
        layout = padded_layout([rollout.routed_experts], [rollout.sample_id], [ids.shape[1]], ids.shape[1],
                               routing_shape(model))
        engine_logp = torch.tensor(rollout.rollout_logprobs)
        with torch.no_grad():
            own, _ = response_logprobs(model, *args, packed=False)
            with replay.use(layout):
                replayed, _ = response_logprobs(model, *args, packed=False)
        agreement.append(float(replay.telemetry()[0]))
        gaps["own"].append((own[0] - engine_logp).abs())
        gaps["replayed"].append((replayed[0] - engine_logp).abs())
    own_gap, replayed_gap = (float(torch.cat(gaps[k]).mean()) for k in ("own", "replayed"))
    print(f"moved routers: agreement {sum(agreement) / len(agreement):.3f}, mean |learner - engine| log-prob "
          f"{own_gap:.2e} routing itself, {replayed_gap:.2e} replayed")
    assert sum(agreement) / len(agreement) < 0.95  # the two sides do disagree
    assert replayed_gap < 0.5 * own_gap, (replayed_gap, own_gap)
