"""`learner.attention: varlen` on each device (`conftest.device`): on CUDA PyTorch's varlen flash
kernels over one packed row give SDPA's padded log-probs, entropies and gradients (bf16, each
within a few times SDPA's own bf16 distance from fp32); on the CPU, where the kernel has none,
the packing's sequences and the refusal. tests/unit/test_attention_choice.py runs the rest of the
path on the CPU with the kernel stood in for."""

from __future__ import annotations

import pytest
import torch

from rlhf_cluster.models import varlen_attention
from rlhf_cluster.models.modeling import flash_attn_installed, load_causal_lm, response_logprobs, training_attention
from rlhf_cluster.models.packing import pack_rows
from rlhf_cluster.models.varlen_attention import VARLEN
from tests.batches import ragged_batch

SHAPES = [(5, 3), (2, 40), (7, 1), (3, 17), (9, 64), (4, 8)]  # (prompt, response): 8, 42, 8, 20, 73, 12 tokens


def _run(model, args, mask, packed):
    logp, ent = response_logprobs(model, *args, 1.0, True, packed=packed)
    ((logp * mask).sum() + (ent * mask).sum()).backward()
    grads = {name: p.grad.float() for name, p in model.named_parameters()}
    return (logp * mask).float(), (ent * mask).float(), grads


def _distance(got, reference):
    """Largest log-prob and entropy distance, and largest per-parameter relative gradient distance."""
    values = max((got[i] - reference[i]).abs().max().item() for i in (0, 1))
    grads = max(((got[2][k] - g).norm() / g.norm().clamp_min(1e-12)).item() for k, g in reference[2].items())
    return values, grads


def test_varlen_packed_rows_equal_sdpa_padded_rows(device, tiny_model_path, monkeypatch):
    b = ragged_batch(SHAPES, seed=1)
    args = [t.to(device) for t in (b.input_ids, b.attention_mask, b.prompt_lengths)] + [b.response_mask.shape[1]]
    packing = pack_rows(*args, VARLEN)
    assert packing.gather.shape[0] == 1, "varlen packs every sequence into one row"
    assert packing.cu_seqlens.tolist() == [0, 73, 115, 135, 147, 155, 163] and packing.max_seqlen == 73
    if device.type == "cpu":
        x = torch.randn(8, 2, 32, dtype=torch.bfloat16)
        with pytest.raises(NotImplementedError):  # flash kernels: none on the CPU
            varlen_attention.flash_varlen(x, x, x, packing.cu_seqlens[:3], 73, None, (-1, 0), True)
        with pytest.raises(ValueError, match="CUDA only"):
            training_attention(VARLEN, device)
        return
    auto = training_attention("auto", device, 0, torch.bfloat16, 32)
    assert auto == ("flash_attention_2" if flash_attn_installed() else VARLEN)
    calls: list[torch.Tensor] = []
    kernel = varlen_attention.flash_varlen
    monkeypatch.setattr(
        varlen_attention, "flash_varlen", lambda q, k, v, cu, *a: calls.append(cu) or kernel(q, k, v, cu, *a)
    )
    mask = b.response_mask.to(device)
    exact = _run(load_causal_lm(tiny_model_path, torch.float32, device, "sdpa"), args, mask, False)
    sdpa = _distance(_run(load_causal_lm(tiny_model_path, torch.bfloat16, device, "sdpa"), args, mask, False), exact)
    varlen_model = load_causal_lm(tiny_model_path, torch.bfloat16, device, VARLEN)
    packed = _distance(_run(varlen_model, args, mask, True), exact)
    assert calls and all(torch.equal(cu, packing.cu_seqlens) for cu in calls)
    print(f"bf16 distance from fp32 SDPA (values, gradients): sdpa {sdpa}, varlen packed {packed}")
    assert packed[0] <= max(3 * sdpa[0], 2e-2) and packed[1] <= max(3 * sdpa[1], 2e-2)
    varlen_model.zero_grad(set_to_none=True)
    padded = _distance(_run(varlen_model, args, mask, False), exact)  # each padded row one sequence
    assert padded[0] <= max(3 * sdpa[0], 2e-2) and padded[1] <= max(3 * sdpa[1], 2e-2)
