"""AdapterBank: Tinker training clients over one frozen tiny model (fp32, CPU, world size 1).

Isolation between clients, gradient accumulation over calls, zero padding of a lower rank,
log-probs against a plain Hugging Face forward, save/load with and without Adam's state, the
exported peft folder, and an SFT run that learns; one test runs the bank sharded by FSDP2 on a
one-rank gloo group.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rlhf_cluster.models.modeling import load_causal_lm
from rlhf_cluster.tinker.bank import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterBank, adapter_digest
from rlhf_cluster.tinker.batch import micro_batches
from rlhf_cluster.tinker.records import AdamParams, Datum, LoraSpec

ADAM = AdamParams(learning_rate=1e-2, weight_decay=0.01)


def sft_rows(seed: int, lengths=(5, 9, 12, 7)) -> list[Datum]:
    rng = np.random.default_rng(seed)
    return [
        Datum(
            rng.integers(2, 250, n),
            {"target_tokens": rng.integers(2, 250, n), "weights": rng.uniform(0, 1, n).astype(np.float32)},
        )
        for n in lengths
    ]


def rl_rows(seed: int, lengths=(6, 10, 4)) -> list[Datum]:
    rng = np.random.default_rng(seed)
    return [
        Datum(
            rng.integers(2, 250, n),
            {
                "target_tokens": rng.integers(2, 250, n),
                "logprobs": -rng.uniform(3, 8, n).astype(np.float32),
                "advantages": rng.normal(0, 1, n).astype(np.float32),
            },
        )
        for n in lengths
    ]


def fb(bank: AdapterBank, model_id: str, rows: list[Datum], backward: bool = True):
    loss = "cross_entropy" if "weights" in rows[0].inputs else "importance_sampling"
    return bank.forward_backward(model_id, rows, loss, {}, backward)


def snapshot(bank: AdapterBank, model_id: str) -> dict:
    """Deep copies of a client's tensors, pending gradients and Adam state."""
    c = bank._clients[model_id]
    return {
        "weights": [w.clone() for w in c.weights],
        "grads": [None if g is None else g.clone() for g in c.grads],
        "adam": [{k: v.clone() for k, v in s.items()} for s in c.adam],
        "steps": c.steps,
    }


def assert_same(a, b) -> None:
    """Bitwise equality of nested lists/dicts of tensors."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_micro_batches_keep_padded_size_under_budget():
    assert micro_batches([5, 9, 12, 7], 20) == [[0, 1], [2], [3]]
    assert micro_batches([5, 9, 12, 7], 24) == [[0, 1], [2, 3]]
    assert micro_batches([30, 2], 10) == [[0], [1]]
    assert micro_batches([3, 3, 3, 3], 1000) == [[0, 1, 2, 3]]


def test_clients_are_isolated_and_interleaving_changes_nothing(tiny_model_path):
    """(a) Steps on A leave B's tensors, pending grads and Adam state bit-identical; A and B
    interleaved end exactly where A alone and B alone end."""
    a_spec, b_spec = LoraSpec(rank=4, seed=1), LoraSpec(rank=8, seed=2)
    a1, a2, b1, b2 = sft_rows(1), rl_rows(2), rl_rows(3), sft_rows(4)
    bank = AdapterBank(tiny_model_path, max_rank=8, micro_tokens=24)
    bank.create("A", a_spec)
    bank.create("B", b_spec)
    fb(bank, "B", b1)
    bank.optim_step("B", ADAM)
    fb(bank, "B", b2)  # pending until B's next step
    before = snapshot(bank, "B")
    fb(bank, "A", a1)
    bank.optim_step("A", ADAM)
    a_out, _ = fb(bank, "A", a2)
    bank.optim_step("A", ADAM)
    assert_same(snapshot(bank, "B"), before)
    assert before["grads"][0] is not None
    bank.optim_step("B", ADAM)

    solo_a = AdapterBank(tiny_model_path, max_rank=8, micro_tokens=24)
    solo_a.create("A", a_spec)
    fb(solo_a, "A", a1)
    solo_a.optim_step("A", ADAM)
    solo_out, _ = fb(solo_a, "A", a2)
    solo_a.optim_step("A", ADAM)
    solo_b = AdapterBank(tiny_model_path, max_rank=8, micro_tokens=24)
    solo_b.create("B", b_spec)
    for rows in (b1, b2):
        fb(solo_b, "B", rows)
        solo_b.optim_step("B", ADAM)
    for x, y in zip(a_out, solo_out):
        assert np.array_equal(x, y)
    assert_same(snapshot(bank, "A"), snapshot(solo_a, "A"))
    assert_same(snapshot(bank, "B"), snapshot(solo_b, "B"))
    assert bank.clients() == ["A", "B"]


def test_gradients_accumulate_over_calls(tiny_model_path):
    """(b) One call on a batch equals two calls on its halves (the loss is a sum), then one step."""
    rows = sft_rows(5)
    bank = AdapterBank(tiny_model_path, max_rank=8, micro_tokens=16)
    bank.create("whole", LoraSpec(rank=8, seed=3))
    bank.create("halves", LoraSpec(rank=8, seed=3))
    whole_out, whole_m = fb(bank, "whole", rows)
    first, first_m = fb(bank, "halves", rows[:2])
    second, second_m = fb(bank, "halves", rows[2:])
    for x, y in zip(whole_out, first + second):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
    assert whole_m["loss:sum"] == pytest.approx(first_m["loss:sum"] + second_m["loss:sum"], rel=1e-5)
    for g, h in zip(bank._clients["whole"].grads, bank._clients["halves"].grads):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-7)
    bank.optim_step("whole", ADAM)
    bank.optim_step("halves", ADAM)
    for w, v in zip(bank._clients["whole"].weights, bank._clients["halves"].weights):
        torch.testing.assert_close(w, v, rtol=1e-5, atol=1e-6)
    assert all(g is None for g in bank._clients["whole"].grads)


def test_lower_rank_is_zero_padded_and_matches_its_own_size(tiny_model_path):
    """(c) A rank-4 client in a rank-8 bank keeps rows/columns 4.. of A/B exactly 0, and follows
    a rank-4 bank's client of the same seed."""
    spec = LoraSpec(rank=4, seed=7)
    wide = AdapterBank(tiny_model_path, max_rank=8)
    narrow = AdapterBank(tiny_model_path, max_rank=4)
    for bank in (wide, narrow):
        bank.create("c", spec)
        for seed in (1, 2, 3):
            fb(bank, "c", sft_rows(seed) if seed % 2 else rl_rows(seed))
            bank.optim_step("c", ADAM)
    c = wide._clients["c"]
    for w, is_a, state in zip(c.weights, wide.is_a, c.adam):
        pad = w[4:] if is_a else w[:, 4:]
        assert pad.numel() and torch.count_nonzero(pad) == 0
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.count_nonzero(state[key][4:] if is_a else state[key][:, 4:]) == 0
    assert torch.count_nonzero(c.weights[1]) > 0  # B moved
    wide_sd, narrow_sd = wide.state_dict("c", True), narrow.state_dict("c", True)
    assert wide_sd["tensors"].keys() == narrow_sd["tensors"].keys()
    for key, t in wide_sd["tensors"].items():
        torch.testing.assert_close(t, narrow_sd["tensors"][key], rtol=1e-4, atol=1e-6)


def hf_logprobs(model, rows: list[Datum], device: torch.device | None = None) -> list[np.ndarray]:
    """log_softmax of a plain forward's float32 logits at each position, at its target (no shift)."""
    out = []
    with torch.no_grad():
        for d in rows:
            logits = model(input_ids=torch.as_tensor(d.tokens, device=device)[None]).logits[0].float()
            target = torch.as_tensor(d.inputs["target_tokens"], device=device)
            out.append(logits.log_softmax(-1).gather(1, target[:, None])[:, 0].cpu().numpy())
    return out


def test_logprobs_equal_a_plain_forward(tiny_model_path):
    """(d) A fresh client (B = 0) scores as the base model; a trained one as the base with its
    adapter put in by peft."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    rows = sft_rows(11)
    bank = AdapterBank(tiny_model_path, max_rank=8, alpha=16.0, micro_tokens=24)
    bank.create("c", LoraSpec(rank=6, seed=5))
    fresh, _ = fb(bank, "c", rows, backward=False)
    base = load_causal_lm(tiny_model_path)
    for x, y in zip(fresh, hf_logprobs(base, rows)):
        assert x.dtype == np.float32 and x.shape == y.shape
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    for seed in (1, 2):
        fb(bank, "c", sft_rows(seed))
        bank.optim_step("c", ADAM)
    trained, _ = fb(bank, "c", rows, backward=False)
    tensors = {k.removeprefix("adapter/"): v for k, v in bank.state_dict("c", False)["tensors"].items()}
    cfg = LoraConfig(r=6, lora_alpha=16, target_modules=bank.targets, lora_dropout=0.0)
    peft_model = get_peft_model(base, cfg)
    result = set_peft_model_state_dict(peft_model, tensors)
    assert not result.unexpected_keys
    for x, y in zip(trained, hf_logprobs(peft_model, rows)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    assert not all(np.allclose(x, y) for x, y in zip(fresh, trained))


def test_save_load_with_and_without_optimizer(tiny_model_path, tmp_path):
    """(e) Save with Adam's state, load into a new client: the next identical step gives equal
    tensors on both. Loading without it starts Adam afresh."""
    bank = AdapterBank(tiny_model_path, max_rank=8)
    bank.create("a", LoraSpec(rank=4, seed=9))
    for seed in (1, 2):
        fb(bank, "a", sft_rows(seed))
        bank.optim_step("a", ADAM)
    bank.save("a", tmp_path / "ckpt", optimizer=True)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["meta.json", "state.safetensors"]
    bank.load("b", tmp_path / "ckpt", optimizer=True)
    for model_id in ("a", "b"):
        fb(bank, model_id, rl_rows(3))
        bank.optim_step(model_id, ADAM)
    assert_same(snapshot(bank, "a"), snapshot(bank, "b"))
    assert snapshot(bank, "b")["steps"] == 3

    bank.load("fresh", tmp_path / "ckpt", optimizer=False)
    state = bank.state_dict("fresh", True)
    assert state["steps"] == 0 and all(k.startswith("adapter/") for k in state["tensors"])
    on_disk = load_file(str(tmp_path / "ckpt" / "state.safetensors"))
    assert any(k.startswith("exp_avg/") for k in on_disk)
    for key, t in state["tensors"].items():
        assert torch.equal(t, on_disk[key])
    fb(bank, "fresh", rl_rows(3))
    bank.optim_step("fresh", ADAM)  # Adam's first step again: not the step "b" took from the same weights
    assert not torch.equal(bank._clients["fresh"].weights[1], bank._clients["b"].weights[1])


def test_exported_adapter_loads_in_peft(tiny_model_path, tmp_path):
    """(f) The exported folder loads with `PeftModel.from_pretrained` and scores as the bank does;
    its digest is that of the file's tensors."""
    from peft import PeftModel

    rows = rl_rows(21)
    bank = AdapterBank(tiny_model_path, max_rank=8)
    bank.create("x", LoraSpec(rank=4, seed=2))
    for seed in (1, 2):
        fb(bank, "x", sft_rows(seed))
        bank.optim_step("x", ADAM)
    digest = bank.export_adapter("x", tmp_path / "sampler")
    config = json.loads((tmp_path / "sampler" / ADAPTER_CONFIG).read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 32.0 and set(config["target_modules"]) == set(bank.targets)
    tensors = load_file(str(tmp_path / "sampler" / ADAPTER_WEIGHTS))
    assert adapter_digest(tensors) == digest
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert tensors[name].shape[0] == 4
    peft_model = PeftModel.from_pretrained(load_causal_lm(tiny_model_path), str(tmp_path / "sampler"))
    ours, _ = fb(bank, "x", rows, backward=False)
    for x, y in zip(ours, hf_logprobs(peft_model, rows)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    assert bank.export_adapter("x", tmp_path / "sampler") == digest  # rewritten in place, same tensors


def test_sft_lowers_the_loss(tiny_model_path):
    """(g) cross_entropy on a few fixed rows, ten steps."""
    rows = sft_rows(31)
    bank = AdapterBank(tiny_model_path, max_rank=8)
    bank.create("sft", LoraSpec(rank=8, seed=0))
    losses = []
    for _ in range(10):
        _, metrics = fb(bank, "sft", rows)
        losses.append(metrics["loss:sum"])
        out = bank.optim_step("sft", AdamParams(learning_rate=1e-2, grad_clip_norm=1.0))
        assert out["lr:mean"] == 1e-2 and out["grad_norm:mean"] > 0
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # random targets: slow, but every step gains
    assert losses[-1] < 0.9 * losses[0]


def test_untrained_layers_stay_zero_and_limits_are_named(tiny_model_path, tmp_path):
    bank = AdapterBank(tiny_model_path, max_rank=8, max_clients=2)
    bank.create("attn", LoraSpec(rank=4, seed=1, train_mlp=False))
    fb(bank, "attn", sft_rows(1))
    bank.optim_step("attn", ADAM)
    c = bank._clients["attn"]
    for w, attn in zip(c.weights, bank.is_attn):
        assert (torch.count_nonzero(w) > 0) == attn  # the MLP's A and B stay 0, the attention's moved
    bank.export_adapter("attn", tmp_path / "a")
    names = load_names(tmp_path / "a" / ADAPTER_WEIGHTS)
    assert names and not any("mlp" in n for n in names)
    fb(bank, "attn", sft_rows(2))
    pending = snapshot(bank, "attn")
    bad = Datum(np.array([1, 2, 10_000]), {"target_tokens": np.array([1, 2, 3]), "weights": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match="vocabulary"):
        fb(bank, "attn", [*sft_rows(3), bad])
    with pytest.raises(ValueError, match="weights"):
        bank.forward_backward("attn", rl_rows(3), "cross_entropy", {}, True)
    assert_same(snapshot(bank, "attn"), pending)  # a refused request leaves the client as it was
    with pytest.raises(ValueError, match="max_rank"):
        bank.create("big", LoraSpec(rank=16))
    bank.create("second", LoraSpec(rank=2))
    with pytest.raises(RuntimeError, match="max_clients"):
        bank.create("third", LoraSpec(rank=2))
    bank.free("second")
    bank.create("third", LoraSpec(rank=2))
    with pytest.raises(KeyError, match="second"):
        bank.optim_step("second", ADAM)


def load_names(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_fsdp_bank_on_one_rank_matches_the_plain_bank(tiny_model_path, gloo_group, tmp_path):
    """FSDP2 over a one-rank gloo group: the swaps copy shards, and two clients' steps end where the
    unsharded bank's do; save and export gather whole tensors."""
    plain = AdapterBank(tiny_model_path, max_rank=8)
    sharded = AdapterBank(tiny_model_path, max_rank=8, fsdp=True)
    assert any(isinstance(p, torch.distributed.tensor.DTensor) for _, p in sharded.params)
    outs = {}
    for bank in (plain, sharded):
        bank.create("a", LoraSpec(rank=4, seed=1))
        bank.create("b", LoraSpec(rank=8, seed=2))
        for seed in (1, 2):
            fb(bank, "a", sft_rows(seed))
            fb(bank, "b", rl_rows(seed))
            bank.optim_step("a", ADAM)
            bank.optim_step("b", AdamParams(learning_rate=1e-2, grad_clip_norm=0.5))
        outs[bank.fsdp] = fb(bank, "a", rl_rows(9), backward=False)[0]
    for x, y in zip(outs[False], outs[True]):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    for model_id in ("a", "b"):
        ours, theirs = plain.state_dict(model_id, True), sharded.state_dict(model_id, True)
        for key, t in ours["tensors"].items():
            torch.testing.assert_close(theirs["tensors"][key], t, rtol=1e-5, atol=1e-6)
    sharded.save("a", tmp_path / "s", optimizer=True)
    sharded.load("c", tmp_path / "s", optimizer=True)
    assert sharded.export_adapter("c", tmp_path / "c") == sharded.export_adapter("a", tmp_path / "a")
    for model_id in ("a", "c"):
        fb(sharded, model_id, sft_rows(4))
        sharded.optim_step(model_id, ADAM)
    assert_same(snapshot(sharded, "a"), snapshot(sharded, "c"))


TWO_RANK_ROWS = (5, 9, 12, 30, 7)


def _two_rank_run(bank: AdapterBank, rows: list[Datum]) -> list[float]:
    """Two clients, three steps each, interleaved; their gradient norms."""
    bank.create("a", LoraSpec(rank=4, seed=1))
    bank.create("b", LoraSpec(rank=8, seed=2))
    norms = []
    for _ in range(3):
        for model_id in ("a", "b"):
            fb(bank, model_id, rows)
            norms.append(
                bank.optim_step(model_id, AdamParams(learning_rate=1e-2, grad_clip_norm=1.0))["grad_norm:mean"]
            )
    return norms


def _bank_rank(rank: int, port: int, model_path: str, results) -> None:
    """One of two sharded ranks, in both modes: the same datums as the other rank, then (`split_data`)
    its own share, rank 0 one datum (one micro-batch) and rank 1 the other four."""
    import traceback

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        rows = sft_rows(8, TWO_RANK_ROWS)
        for split in (False, True):
            bank = AdapterBank(model_path, max_rank=8, micro_tokens=16, fsdp=True, split_data=split)
            share = (rows[:1] if rank == 0 else rows[1:]) if split else rows
            norms = _two_rank_run(bank, share)
            state = {k: v.numpy() for k, v in bank.state_dict("a", True)["tensors"].items()}  # arrays: no shared memory
            results.put((rank, split, norms, state))
    except BaseException as exc:
        results.put((rank, "error", f"{exc!r}\n{traceback.format_exc()}", None))
    finally:
        dist.destroy_process_group()


def test_two_sharded_ranks_step_as_one_bank(tiny_model_path):
    """Two FSDP2 ranks on gloo step as one unsharded bank on the whole batch: each running the whole
    batch (FSDP2 averages equal gradients), and each running its share (`split_data`: unequal
    micro-batch counts, the short rank running empty ones; gradients summed, not averaged)."""
    from tests.process_groups import join_ranks, spawn_ranks

    results, procs = spawn_ranks(_bank_rank, 2, tiny_model_path)
    try:
        found = [results.get(timeout=180) for _ in range(4)]
    finally:
        join_ranks(procs)
    errors = [r for r in found if r[1] == "error"]
    assert not errors, errors
    whole = AdapterBank(tiny_model_path, max_rank=8, micro_tokens=16)
    norms = _two_rank_run(whole, sft_rows(8, TWO_RANK_ROWS))
    state = whole.state_dict("a", True)["tensors"]
    assert sorted((rank, split) for rank, split, _, _ in found) == [(0, False), (0, True), (1, False), (1, True)]
    for _, _, rank_norms, rank_state in found:
        np.testing.assert_allclose(rank_norms, norms, rtol=1e-5)
        for key, t in state.items():
            np.testing.assert_allclose(rank_state[key], t.numpy(), rtol=1e-5, atol=1e-6)
