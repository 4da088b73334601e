"""Rollout routing replay (`models.routing_replay`, `models.routed_experts`) on tiny random MoE
models built in code: replaying the model's own routing changes nothing (log-probs and gradients,
padded and packed rows, with gradient checkpointing); replaying an engine's routing brings the
learner's log-probs closer to the engine's; the compact form, the telemetry and the refusals."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from rlhf_cluster.models.modeling import response_logprobs
from rlhf_cluster.models.packing import pack_rows
from rlhf_cluster.models.routed_experts import RoutedExperts, compact_routing, expand_routing
from rlhf_cluster.models.routing_replay import (
    ReplayLayout,
    RoutingReplay,
    capture_routing,
    load_balance,
    padded_layout,
    routing_agreement,
    routing_shape,
    rows_layout,
    sharded_layout,
)

VOCAB = 128
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
MOE = dict(num_experts_per_tok=2, max_position_embeddings=64)


def qwen3_moe(norm_topk_prob: bool = False, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(**SHAPE, **MOE, head_dim=32, intermediate_size=128, moe_intermediate_size=32, num_experts=8)
    config.norm_topk_prob = norm_topk_prob
    return Qwen3MoeForCausalLM(config).float()


def batch(lengths=(14, 6, 8), prompt=(5, 3, 4), seed: int = 1):
    """Right-padded rows of random tokens: (input_ids, attention_mask, prompt_lengths, response_len)."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), L), generator=g)
    mask = (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask, torch.tensor(prompt), L - min(prompt)


def logprobs(model, ids, mask, prompt_lengths, T, packing=None):
    return response_logprobs(model, ids, mask, prompt_lengths, T, packed=packing is not None, packing=packing)[0]


def response_mask(mask, prompt_lengths, T):
    lengths = mask.sum(1)
    return (torch.arange(T)[None, :] < (lengths - prompt_lengths)[:, None]).float()


def own_routings(model, ids, mask, packing=None) -> list[RoutedExperts]:
    """The model's own routing of each sequence (positions 0..len-2, as an engine returns it),
    captured on the padded or the packed rows and mapped back to the samples."""
    B, L = ids.shape
    shape = routing_shape(model)
    with torch.no_grad(), capture_routing(model) as seen:
        if packing is None:
            model(input_ids=ids, attention_mask=mask)
        else:
            attention = packing.attention_mask("sdpa", torch.float32)
            model(input_ids=packing.input_ids(ids), position_ids=packing.position_ids, attention_mask=attention)
    padded = torch.zeros(B * L, shape.layers, shape.top_k, dtype=torch.long)
    if packing is None:
        padded = seen[0]
    else:
        real = packing.sequence_ids.reshape(-1) >= 0
        padded[packing.gather.reshape(-1)[real]] = seen[0][real]
    padded = padded.view(B, L, shape.layers, shape.top_k)
    return [compact_routing(padded[i, : int(n) - 1], shape.num_experts) for i, n in enumerate(mask.sum(1))]


def layout_for(model, routings, ids, mask, packing=None):
    shape = routing_shape(model)
    lengths = mask.sum(1).tolist()
    layout = padded_layout(routings, [f"s{i}" for i in range(len(lengths))], lengths, ids.shape[1], shape)
    return rows_layout(layout, packing)


def loss_and_grads(model, run):
    model.zero_grad()
    logp = run()
    logp.sum().backward()
    return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("norm_topk_prob", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_replaying_own_routing_changes_nothing(norm_topk_prob, packed):
    model = qwen3_moe(norm_topk_prob)
    ids, mask, pl, T = batch()
    packing = pack_rows(ids, mask, pl, T, "sdpa") if packed else None
    if packed:
        assert packing.gather.numel() < ids.numel()  # really packed (fewer, fuller rows)
    rm = response_mask(mask, pl, T)
    base, grads = loss_and_grads(model, lambda: logprobs(model, ids, mask, pl, T, packing) * rm)
    layout = layout_for(model, own_routings(model, ids, mask, packing), ids, mask, packing)
    replay = RoutingReplay(model)
    with replay.use(layout):
        again, regrads = loss_and_grads(model, lambda: logprobs(model, ids, mask, pl, T, packing) * rm)
    replay.remove()
    assert torch.equal(base, again)
    assert grads.keys() == regrads.keys() and any("mlp.gate.weight" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(regrads[name], grads[name], rtol=0, atol=1e-7, msg=name)
    assert grads["model.layers.0.mlp.gate.weight"].abs().sum() > 0  # the router learns on the replayed path


@pytest.mark.parametrize("arch", ["qwen2_moe", "olmoe", "mixtral"])
def test_other_softmax_topk_routers_replay_exactly(arch):
    torch.manual_seed(0)
    if arch == "qwen2_moe":
        config = Qwen2MoeConfig(
            **SHAPE, **MOE, num_experts=8, intermediate_size=64, moe_intermediate_size=32,
            shared_expert_intermediate_size=32, norm_topk_prob=True,
        )  # fmt: skip
        model = Qwen2MoeForCausalLM(config)
    elif arch == "olmoe":
        model = OlmoeForCausalLM(OlmoeConfig(**SHAPE, **MOE, num_experts=8, intermediate_size=32))
    else:
        model = MixtralForCausalLM(MixtralConfig(**SHAPE, **MOE, num_local_experts=8, intermediate_size=32))
    ids, mask, pl, T = batch()
    base = logprobs(model, ids, mask, pl, T).detach()
    replay = RoutingReplay(model)
    with replay.use(layout_for(model, own_routings(model, ids, mask), ids, mask)), torch.no_grad():
        assert torch.equal(logprobs(model, ids, mask, pl, T), base)
    rolled = [compact_routing((expand_routing(r, "s", 20, 2, 2, 8) + 1) % 8, 8) for r in own_routings(model, ids, mask)]
    with replay.use(layout_for(model, rolled, ids, mask)), torch.no_grad():
        assert not torch.allclose(logprobs(model, ids, mask, pl, T), base)  # the replay does act


def engine_of(model, noise: float = 0.1, seed: int = 7):
    """An engine's copy of `model`: bf16 weights and a router perturbed by `noise` of its own scale
    (other kernels and numerics), so that it routes some tokens differently."""
    engine = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in engine.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.add_(torch.randn(p.shape, generator=g) * p.std() * noise)
    return engine.to(torch.bfloat16)


def test_replay_brings_learner_logprobs_closer_to_the_engine():
    """The issue's Done-when: on a model whose routing the engine and the learner disagree on, the
    learner's log-probs of the sampled tokens are closer to the engine's with replay than without."""
    model = qwen3_moe(norm_topk_prob=True)
    engine = engine_of(model)
    ids, mask, pl, T = batch(lengths=(20, 16, 18, 12), prompt=(6, 4, 5, 3), seed=3)
    rm = response_mask(mask, pl, T).bool()
    with torch.no_grad():
        engine_logp = logprobs(engine, ids, mask, pl, T).float()
        routed = own_routings(engine, ids, mask)
        learner_routing = own_routings(model, ids, mask)
        plain = logprobs(model, ids, mask, pl, T)
        replay = RoutingReplay(model)
        with replay.use(layout_for(model, routed, ids, mask)):
            replayed = logprobs(model, ids, mask, pl, T)
    shape = routing_shape(model)
    a = torch.cat([torch.from_numpy(expand_routing(r, "s", 20, 2, 2, 8)) for r in routed])
    b = torch.cat([torch.from_numpy(expand_routing(r, "s", 20, 2, 2, 8)) for r in learner_routing])
    agreement, metrics = routing_agreement(a, b, layers=shape.moe_layers)
    assert 0.8 < agreement < 0.98  # the two sides disagree on some tokens (real engines: ~10%), not on most
    # Counted in the replayed forward, no extra pass: each layer's own choice given the replayed
    # layers before it (per router), near the end-to-end agreement of an unreplayed forward.
    seen, telemetry = replay.telemetry()
    assert abs(seen.item() - agreement.item()) < 0.05 and telemetry["replayed_pairs"] == len(a) * 2
    assert replay.telemetry()[1]["replayed_pairs"] == 0  # read out once
    gap_without = (plain - engine_logp).abs()[rm].mean()
    gap_with = (replayed - engine_logp).abs()[rm].mean()
    assert gap_with < 0.6 * gap_without, (gap_with, gap_without, metrics)


@pytest.mark.parametrize("reentrant", [False, True])
def test_replay_survives_gradient_checkpointing(reentrant):
    """A checkpointed layer re-runs its forward in the backward: it must replay the same experts
    there, or the gradients are those of another routing."""
    model = qwen3_moe(norm_topk_prob=True)
    ids, mask, pl, T = batch()
    routed = own_routings(engine_of(model, noise=2.0), ids, mask)
    layout = layout_for(model, routed, ids, mask)
    replay = RoutingReplay(model)
    model.train()
    with replay.use(layout):
        _, plain = loss_and_grads(model, lambda: logprobs(model, ids, mask, pl, T))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    with replay.use(layout):
        _, checkpointed = loss_and_grads(model, lambda: logprobs(model, ids, mask, pl, T))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_compact_form_round_trips_in_small_ints():
    experts = np.random.default_rng(0).integers(0, 8, size=(5, 2, 2))
    routed = compact_routing(experts, num_experts=8, start=3)
    assert len(routed.data) == 5 * 2 * 2 and not routed.wide and routed.tokens == 5
    assert np.array_equal(expand_routing(routed, "s", 9, 2, 2, 8), experts)
    wide = compact_routing(torch.tensor([[[299, 0]]]), num_experts=300)
    assert wide.wide and len(wide.data) == 4
    assert expand_routing(wide, "s", 2, 1, 2, 300).tolist() == [[[299, 0]]]


def test_bad_routings_are_refused_naming_what_was_expected():
    with pytest.raises(ValueError, match=r"sample a: .*\[tokens, layers, top_k\], got int64 of shape \[4, 2\]"):
        compact_routing(np.zeros((4, 2), dtype=np.int64), 8, sample_id="a")
    with pytest.raises(ValueError, match=r"sample b: routed expert 8 out of range: the model has 8 experts"):
        compact_routing(np.full((2, 2, 2), 8), 8, sample_id="b")
    routed = compact_routing(np.zeros((4, 3, 2), dtype=np.int64), 16)
    with pytest.raises(ValueError, match=r"sample c: routed experts of 3 layers x top-2 .*expects \[tokens, 2, 2\]"):
        expand_routing(routed, "c", 10, 2, 2, 16)
    with pytest.raises(ValueError, match=r"sample d: routed experts for positions 0..3 of a 3-token sequence"):
        expand_routing(routed, "d", 3, 3, 2, 16)
    high = compact_routing(np.full((2, 2, 2), 12), 16)
    with pytest.raises(ValueError, match=r"sample e: routed expert 12 out of range: the model has 8 experts"):
        expand_routing(high, "e", 5, 2, 2, 8)


def test_rows_layout_follows_where_response_logprobs_packs():
    model = qwen3_moe()
    ids, mask, pl, T = batch(lengths=(8, 8), prompt=(3, 3))
    padded = layout_for(model, own_routings(model, ids, mask), ids, mask)
    unpaid = pack_rows(ids, mask, pl, T, "sdpa")  # two full rows: packing holds no fewer slots
    assert rows_layout(padded, unpaid) is padded
    assert rows_layout(padded, unpaid, always=True).replayed.numel() == unpaid.gather.numel()


def test_replay_refuses_a_dense_model_and_a_mislaid_layout():
    torch.manual_seed(0)
    dense = Qwen3ForCausalLM(Qwen3Config(**SHAPE, head_dim=32, intermediate_size=64))
    with pytest.raises(ValueError, match="needs a mixture-of-experts model; Qwen3ForCausalLM has no MoE layers"):
        RoutingReplay(dense)
    model = qwen3_moe()
    ids, mask, pl, T = batch()
    packing = pack_rows(ids, mask, pl, T, "sdpa")
    padded = layout_for(model, own_routings(model, ids, mask), ids, mask)
    replay = RoutingReplay(model)
    with replay.use(padded), pytest.raises(ValueError, match=r"layout holds 42 tokens but MoE layer 0 runs 28"):
        logprobs(model, ids, mask, pl, T, packing)


def test_agreement_and_load_balance():
    engine = torch.tensor([[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[0, 2], [1, 3]]])
    learner = engine.clone()
    learner[0, 0] = torch.tensor([1, 0])  # the same set in another order agrees
    learner[1, 1] = torch.tensor([6, 5])  # another set
    share, metrics = routing_agreement(engine, learner)
    assert share.item() == pytest.approx(5 / 6) and metrics["token_agreement"].item() == pytest.approx(2 / 3)
    share, _ = routing_agreement(engine, learner, mask=torch.tensor([True, False, True]))
    assert share.item() == 1.0
    counts, metrics = load_balance(engine, 8, layers=[0])
    assert counts.tolist() == [[2, 1, 1, 0, 1, 1, 0, 0]]
    assert metrics["load_max_over_mean"].item() == pytest.approx(2 / (6 / 8))


def test_sharded_layout_follows_the_sequence_parallel_slices():
    experts = torch.arange(2 * 5).view(10, 1, 1).expand(10, 2, 2)
    layout = ReplayLayout(experts, torch.ones(10, dtype=torch.bool))  # 2 packed rows of 5 slots
    first, second = (sharded_layout(layout, rows=2, world=2, rank=r) for r in (0, 1))
    assert first.experts[:, 0, 0].tolist() == [0, 1, 2, 5, 6, 7]
    assert second.experts[:, 0, 0].tolist() == [3, 4, 0, 8, 9, 0]
    assert second.replayed.tolist() == [True, True, False, True, True, False]  # the padding slot


def test_the_project_tiny_moe_replays_its_own_routing_exactly():
    from rlhf_cluster.config import TinyModelConfig
    from rlhf_cluster.models.tiny_model import build_model

    model = build_model(TinyModelConfig(architecture="qwen3_moe"), VOCAB, eos_id=1, pad_id=0)
    ids, mask, pl, T = batch()
    shape = routing_shape(model)
    assert (shape.num_experts, shape.top_k, shape.moe_layers) == (8, 2, (0, 1))
    replay = RoutingReplay(model)
    with torch.no_grad():
        base = logprobs(model, ids, mask, pl, T)
        with replay.use(layout_for(model, own_routings(model, ids, mask), ids, mask)):
            assert torch.equal(logprobs(model, ids, mask, pl, T), base)


def test_the_compact_form_needs_no_torch():
    """The buffer and the scoring pools read samples without importing torch."""
    import subprocess
    import sys

    code = "import sys, rlhf_cluster.models.routed_experts; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
