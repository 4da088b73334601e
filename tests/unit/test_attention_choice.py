"""Varlen attention (rlhf_cluster/models/varlen_attention.py) and `learner.attention: auto`
(modeling.choose_attention). The kernel is CUDA only: here it is stood in for by per-sequence SDPA,
so everything around it (the sequences planned with the packing, the keyword arguments reaching
every layer, the layout in and out, GQA) is checked on the CPU; tests/gpu runs the real kernel."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from rlhf_cluster.models import modeling, varlen_attention
from rlhf_cluster.models.modeling import choose_attention, load_causal_lm, response_logprobs, training_attention
from rlhf_cluster.models.packing import pack_rows, plan_packing
from rlhf_cluster.models.varlen_attention import VARLEN, cu_seqlens_of
from tests.batches import ragged_batch

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def reference_varlen(q, k, v, cu_seqlens, max_seqlen, scale, window_size, enable_gqa):
    """What `varlen_attn` computes, by SDPA on each run of `cu_seqlens` (causal, or bidirectional at
    window (-1, -1); GQA repeated)."""
    assert window_size in ((-1, 0), (-1, -1)) and cu_seqlens.dtype == torch.int32
    bounds = cu_seqlens.tolist()
    assert max_seqlen == max(b - a for a, b in zip(bounds, bounds[1:]))
    groups = q.shape[1] // k.shape[1]
    assert enable_gqa == (groups > 1)
    out = []
    for a, b in zip(bounds, bounds[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        causal = window_size == (-1, 0)
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale).transpose(0, 1))
    return torch.cat(out)


@pytest.fixture
def reference_kernel(monkeypatch):
    """The CPU stand-in for the kernel; each call's cu_seqlens kept."""
    calls: list[torch.Tensor] = []

    def kernel(q, k, v, cu_seqlens, *rest):
        calls.append(cu_seqlens)
        return reference_varlen(q, k, v, cu_seqlens, *rest)

    monkeypatch.setattr(varlen_attention, "flash_varlen", kernel)
    return calls


def test_cu_seqlens_come_from_the_packing_hand_computed():
    # One row (varlen, flash): longest first, 5 at 0, 4 at 5, 2 at 9.
    one = plan_packing([4, 2, 5], [2, 1, 3], 5, 3, None)
    assert one.cu_seqlens.tolist() == [0, 5, 9, 11] and one.max_seqlen == 5
    assert one.cu_seqlens.dtype == torch.int32
    # Rows of 5 slots (SDPA's): [5], [4, tail 1], [2, tail 3]: each tail a run of its own.
    rows = plan_packing([4, 2, 5], [2, 1, 3], 5, 3, 5)
    assert rows.gather.shape == (3, 5)
    assert rows.cu_seqlens.tolist() == [0, 5, 9, 10, 12, 15] and rows.max_seqlen == 5
    assert one.varlen_kwargs() == {
        "cu_seq_lens_q": one.cu_seqlens,
        "cu_seq_lens_k": one.cu_seqlens,
        "max_length_q": 5,
        "max_length_k": 5,
    }
    moved = one.to(CPU)
    assert moved.max_seqlen == 5 and torch.equal(moved.cu_seqlens, one.cu_seqlens)


def test_cu_seqlens_from_position_ids_hand_computed():
    position_ids = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]])
    cu, longest = cu_seqlens_of(position_ids)
    assert cu.tolist() == [0, 3, 5, 9, 10] and longest == 4
    cu, longest = cu_seqlens_of(torch.tensor([[3, 4, 5], [1, 2, 3]]))  # no restart: each row one sequence
    assert cu.tolist() == [0, 3, 6] and longest == 3


@pytest.mark.parametrize("packed", [True, False])
def test_varlen_log_probs_and_gradients_equal_sdpa_on_padded_rows(tiny_model_path, reference_kernel, packed):
    """A model switched to `varlen` through transformers' attention interface: packed (one row,
    the packing's cu_seqlens) or padded (each row one sequence), the same values and gradients as
    SDPA on right-padded rows."""
    sdpa = load_causal_lm(tiny_model_path, attention="sdpa")
    varlen = load_causal_lm(tiny_model_path, attention=VARLEN)
    assert varlen.config._attn_implementation == VARLEN
    b = ragged_batch([(5, 3), (2, 11), (7, 1), (3, 6)])
    args = (b.input_ids, b.attention_mask, b.prompt_lengths, b.response_mask.shape[1])
    mask = b.response_mask
    a, a_ent = response_logprobs(sdpa, *args, 0.9, True, packed=False)
    c, c_ent = response_logprobs(varlen, *args, 0.9, True, packed=packed)
    layers = sdpa.config.num_hidden_layers
    if packed:
        expected = pack_rows(*args, VARLEN).cu_seqlens
        assert len(reference_kernel) == layers and all(torch.equal(cu, expected) for cu in reference_kernel)
        assert expected.tolist() == [0, 13, 22, 30, 38]  # 8, 13, 8, 9 tokens, longest first: 13, 9, 8, 8
    else:
        L = b.input_ids.shape[1]
        assert [cu.tolist() for cu in reference_kernel] == [[0, L, 2 * L, 3 * L, 4 * L]] * layers
    assert torch.allclose(a * mask, c * mask, atol=1e-5) and torch.allclose(a_ent * mask, c_ent * mask, atol=1e-5)
    ((a * mask).sum() + (a_ent * mask).sum()).backward()
    ((c * mask).sum() + (c_ent * mask).sum()).backward()
    for (name, p), q in zip(sdpa.named_parameters(), varlen.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name


def test_without_planned_sequences_they_come_from_the_position_ids(tiny_model_path, reference_kernel):
    """A caller passing only position ids that restart per sequence (no cu_seqlens: the critic's
    packed path) gets the same sequences."""
    model = load_causal_lm(tiny_model_path, attention=VARLEN)
    reference = copy.deepcopy(model)
    reference.config._attn_implementation = "sdpa"
    ids = torch.randint(2, 200, (1, 9), generator=torch.Generator().manual_seed(0))
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        got = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
        first = reference(input_ids=ids[:, :4], use_cache=False).logits
        second = reference(input_ids=ids[:, 4:], use_cache=False).logits
    assert reference_kernel[0].tolist() == [0, 4, 9]
    assert torch.allclose(got, torch.cat([first, second], 1), atol=1e-5)


def test_the_kernel_has_no_cpu_implementation():
    """The CPU is SDPA's: PyTorch's varlen kernels are flash kernels, CUDA only."""
    x = torch.randn(6, 2, 32, dtype=torch.bfloat16)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="_flash_attention_forward"):
        varlen_attention.flash_varlen(x, x, x, cu, 4, None, (-1, 0), False)


@pytest.mark.parametrize(
    ("device", "flash", "varlen", "dtype", "head_dim", "max_new", "expected"),
    [
        ("cpu", True, True, torch.bfloat16, 64, 8192, "sdpa"),  # the CPU is SDPA's, whatever is installed
        ("cuda", True, True, torch.bfloat16, 64, 0, "flash_attention_2"),  # flash-attn first where installed
        ("cuda", True, False, torch.float32, 64, 8192, "flash_attention_2"),
        ("cuda", False, True, torch.bfloat16, 64, 0, VARLEN),  # then torch's varlen, at any length
        ("cuda", False, True, torch.float16, 128, 8192, VARLEN),
        ("cuda", False, True, torch.float32, 64, 8192, "flex_attention"),  # fp32: no flash kernel
        ("cuda", False, True, torch.bfloat16, 320, 8192, "flex_attention"),  # head too large
        ("cuda", False, True, torch.bfloat16, 36, 0, "sdpa"),  # not a multiple of 8, short responses
        ("cuda", False, True, None, None, 8192, "flex_attention"),  # unknown dtype: not promised to run
        ("cuda", False, False, torch.bfloat16, 64, 2048, "flex_attention"),  # then flex for long responses
        ("cuda", False, False, torch.bfloat16, 64, 2047, "sdpa"),  # SDPA below
    ],
)
def test_the_auto_rule_on_every_branch(monkeypatch, device, flash, varlen, dtype, head_dim, max_new, expected):
    monkeypatch.setattr(modeling, "VARLEN_IN_AUTO", True)  # the rule once a GPU has measured varlen
    assert choose_attention(device, flash, varlen, dtype, head_dim, max_new) == expected


def test_auto_takes_varlen_since_a_gpu_measured_it(monkeypatch):
    """`modeling.VARLEN_IN_AUTO` is on (one H200 timed varlen ahead of SDPA and FlexAttention at every
    length); switched off, `auto` is the rule before varlen: flex or SDPA."""
    assert modeling.VARLEN_IN_AUTO
    assert choose_attention("cuda", False, True, torch.bfloat16, 64, 0) == VARLEN
    monkeypatch.setattr(modeling, "VARLEN_IN_AUTO", False)
    assert choose_attention("cuda", False, True, torch.bfloat16, 64, 8192) == "flex_attention"
    assert choose_attention("cuda", False, True, torch.bfloat16, 64, 0) == "sdpa"


@pytest.mark.parametrize(("flash", "varlen"), [(True, True), (False, True), (False, False)])
def test_auto_asks_what_is_installed_here(monkeypatch, flash, varlen):
    """`training_attention` answers the rule's capabilities from this environment (patched here)."""
    monkeypatch.setattr(modeling, "VARLEN_IN_AUTO", True)
    monkeypatch.setattr(modeling, "flash_attn_installed", lambda: flash)
    monkeypatch.setattr(varlen_attention, "installed", lambda: varlen)
    got = training_attention("auto", CUDA, 4096, torch.bfloat16, 64)
    assert got == ("flash_attention_2" if flash else VARLEN if varlen else "flex_attention")
    assert training_attention("auto", CPU, 4096, torch.bfloat16, 64) == "sdpa"
    assert training_attention("auto", CUDA, 1024) == ("flash_attention_2" if flash else "sdpa")  # dtype unknown


def test_the_installed_answers_are_this_environments():
    """torch 2.13 has varlen_attn; flash-attn is a GPU extra (absent here, asked by import)."""
    assert varlen_attention.installed()
    try:
        import flash_attn  # noqa: F401

        present = True
    except ImportError:
        present = False
    assert modeling.flash_attn_installed() == present


def test_varlen_chosen_by_hand_is_refused_where_it_cannot_run(monkeypatch):
    with pytest.raises(ValueError, match="CUDA only"):
        training_attention(VARLEN, CPU)
    with pytest.raises(ValueError, match=r"fp16/bf16 \(learner.mixed_precision: bf16\).* not float32 with head_dim 64"):
        training_attention(VARLEN, CUDA, dtype=torch.float32, head_dim=64)
    with pytest.raises(ValueError, match="multiple of 8 up to 256, not bfloat16 with head_dim 36"):
        training_attention(VARLEN, CUDA, dtype=torch.bfloat16, head_dim=36)
    assert training_attention(VARLEN, CUDA, dtype=torch.bfloat16, head_dim=64) == VARLEN
    monkeypatch.setattr(varlen_attention, "installed", lambda: False)
    with pytest.raises(ValueError, match="PyTorch >= 2.10"):
        training_attention(VARLEN, CUDA)


def test_the_head_size_read_before_loading(tiny_model_path, tmp_path):
    from rlhf_cluster.models.modeling import head_dim_of

    assert head_dim_of(tiny_model_path) == 32  # hidden 64 over 2 heads
    text = {"hidden_size": 896, "num_attention_heads": 14, "head_dim": 128}
    (tmp_path / "config.json").write_text(json.dumps({"text_config": text}))
    assert head_dim_of(tmp_path) == 128
    (tmp_path / "config.json").write_text('{"hidden_size": 896}')
    assert head_dim_of(tmp_path) is None


@pytest.mark.parametrize(("precision", "expected"), [("bf16", VARLEN), ("none", "sdpa")])
def test_a_learner_rank_asks_with_its_compute_dtype_and_head_size(monkeypatch, tiny_model_path, precision, expected):
    """What the FSDP2 and DeepSpeed ranks call: bf16 compute (learner.mixed_precision) lets `auto`
    choose varlen on CUDA; float32 weights do not (varlen's kernels take fp16/bf16)."""
    from rlhf_cluster.models.modeling import learner_attention

    monkeypatch.setattr(modeling, "VARLEN_IN_AUTO", True)
    monkeypatch.setattr(modeling, "flash_attn_installed", lambda: False)
    monkeypatch.setattr(varlen_attention, "installed", lambda: True)
    assert learner_attention("auto", CUDA, 1024, precision, tiny_model_path) == expected
    assert learner_attention("auto", CPU, 1024, precision, tiny_model_path) == "sdpa"


def test_a_vision_language_models_auto_leaves_varlen_out(monkeypatch, tmp_path):
    """Its vision tower under varlen has not run on a GPU: `auto` keeps the rule before varlen;
    varlen asked by hand is still given."""
    from rlhf_cluster.models.modeling import learner_attention

    monkeypatch.setattr(modeling, "flash_attn_installed", lambda: False)
    monkeypatch.setattr(varlen_attention, "installed", lambda: True)
    text = {"hidden_size": 2048, "num_attention_heads": 16}
    (tmp_path / "config.json").write_text(json.dumps({"text_config": text, "vision_config": {"depth": 2}}))
    assert learner_attention("auto", CUDA, 1024, "bf16", tmp_path) == "sdpa"
    assert learner_attention(VARLEN, CUDA, 1024, "bf16", tmp_path) == VARLEN


def test_a_varlen_kernel_without_a_grouped_query_switch_gets_the_heads_repeated(monkeypatch):
    """torch 2.11's `varlen_attn` takes no `enable_gqa` (found on one H200): the kv heads are repeated."""
    import torch.nn.attention.varlen as varlen

    from rlhf_cluster.models.varlen_attention import flash_varlen

    seen = []

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window_size=(-1, -1)):
        seen.append((k.shape, v.shape))
        return q

    monkeypatch.setattr(varlen, "varlen_attn", kernel)
    q, k = torch.randn(5, 4, 8), torch.randn(5, 2, 8)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    flash_varlen(q, k, k.clone(), cu, 5, None, (-1, -1), enable_gqa=True)
    assert seen == [(torch.Size([5, 4, 8]), torch.Size([5, 4, 8]))]
    # without grouped queries (a vision tower's attention) the word is not passed either: it failed there
    flash_varlen(q, q.clone(), q.clone(), cu, 5, None, (-1, -1), enable_gqa=False)
    assert seen[1] == (torch.Size([5, 4, 8]), torch.Size([5, 4, 8]))


@pytest.mark.parametrize("causal", [True, False])
def test_a_bidirectional_layer_gets_bidirectional_varlen(reference_kernel, causal):
    """A vision tower's attention (`is_causal=False`, Qwen2.5-VL's blocks pass it per image) sees
    each whole sequence; a decoder layer's sees its past. Against SDPA on each sequence."""
    from rlhf_cluster.models.varlen_attention import varlen_attention_forward

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 7, 8, generator=g) for _ in range(3))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    layer = torch.nn.Module()
    layer.is_causal = causal
    out, _ = varlen_attention_forward(layer, q, k, v, None, cu_seq_lens_q=cu, max_length_q=4, is_causal=causal)
    expected = torch.cat(
        [F.scaled_dot_product_attention(q[..., a:b, :], k[..., a:b, :], v[..., a:b, :], is_causal=causal)
         for a, b in ((0, 3), (3, 7))],
        dim=2,
    ).transpose(1, 2)
    torch.testing.assert_close(out, expected)
    if not causal:
        with pytest.raises(ValueError, match="sliding window is causal"):
            varlen_attention_forward(layer, q, k, v, None, sliding_window=2, cu_seq_lens_q=cu, max_length_q=4)
