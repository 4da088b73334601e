"""AdapterBank on each device, sharded by FSDP2 over a one-rank group (NCCL on CUDA, gloo on the CPU):
two clients stay isolated (one's tensors, pending gradients and Adam state untouched by the other's
steps), a saved state with Adam's (fused AdamW on CUDA: its step counters on the device) loads into a
new client that then steps exactly as the original, and the exported adapter scores as the bank."""

from __future__ import annotations

import numpy as np
import torch

from rlhf_cluster.tinker.bank import AdapterBank
from rlhf_cluster.tinker.records import LoraSpec
from tests.unit.test_adapter_bank import ADAM, assert_same, fb, hf_logprobs, rl_rows, sft_rows, snapshot


def test_adapter_bank_on_device(device_group, tiny_model_path, tmp_path):
    device = device_group
    bank = AdapterBank(tiny_model_path, max_rank=8, fsdp=True, device=device)
    bank.create("a", LoraSpec(rank=4, seed=1))
    bank.create("b", LoraSpec(rank=8, seed=2))
    fb(bank, "b", rl_rows(1))
    bank.optim_step("b", ADAM)
    fb(bank, "b", sft_rows(2))
    before = snapshot(bank, "b")
    for seed in (3, 4):
        fb(bank, "a", sft_rows(seed))
        bank.optim_step("a", ADAM)
    assert_same(snapshot(bank, "b"), before)
    assert all(w.device.type == device.type for w in before["weights"])

    bank.save("a", tmp_path / "a", optimizer=True)
    bank.load("c", tmp_path / "a", optimizer=True)
    for model_id in ("a", "c"):
        fb(bank, model_id, rl_rows(5))
        bank.optim_step(model_id, ADAM)
    assert_same(snapshot(bank, "a"), snapshot(bank, "c"))

    from peft import PeftModel

    from rlhf_cluster.models.modeling import load_causal_lm

    bank.export_adapter("a", tmp_path / "export")
    peft_model = PeftModel.from_pretrained(load_causal_lm(tiny_model_path, device=device), str(tmp_path / "export"))
    rows = sft_rows(6)
    ours, _ = fb(bank, "a", rows, backward=False)
    theirs = hf_logprobs(peft_model, rows, device)
    tol = 1e-4 if device.type == "cuda" else 1e-5  # float32 both; on CUDA other kernels for batched rows
    for x, y in zip(ours, theirs):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)
    assert torch.isfinite(torch.as_tensor(np.concatenate(ours))).all()
