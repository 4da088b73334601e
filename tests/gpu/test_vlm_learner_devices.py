"""A vision-language policy's learner step on each device (world size 1): the tiny VLM's rows with
images (`tests/unit/test_vlm_learner.py`) through FSDP2 in fp32 and in bf16 with checkpointing,
its vision tower trained (`learner.freeze_vision: false`). On the CPU in `make test`, on CUDA on a
GPU machine (`conftest.device`)."""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_vlm_learner import RESPONSES, _batch, _learner, expected, local_prompts, vlm  # noqa: F401

# fp32 on a GPU against the CPU's fp32 (as test_learner_on_devices); bf16 weights and activations
# move a random tiny model's log-probs by a few 1e-2.
TOLERANCE = {"none": 1e-3, "bf16": 0.1}  # measured on the CPU: 9.5e-7 and 0.017


@pytest.mark.parametrize("precision", ["none", "bf16"])
def test_vlm_step_on_device(device_group, vlm, expected, precision):  # noqa: F811  # the imported fixtures
    device = device_group
    path = vlm[0]
    learner = _learner(
        path, freeze_vision=False, mixed_precision=precision, gradient_checkpointing=precision == "bf16", lr=1e-3
    )
    assert next(learner.model.parameters()).device.type == device.type
    batch = _batch(vlm)
    probe = learner.probe_logprobs(local_prompts(vlm), [list(r) for r in RESPONSES], list(batch.images or []))
    worst = max((torch.tensor(p) - want).abs().max().item() for p, want in zip(probe, expected))
    print(f"{device.type} {precision}: learner vs CPU fp32 max |logp diff| on image rows {worst:.3g}")
    assert worst < TOLERANCE[precision]
    stats = learner.train_step(batch, kl_coef=0.01)
    assert torch.isfinite(torch.tensor(stats["policy/loss"])) and stats["learner/grad_norm"] > 0
    sent = dict(learner.named_engine_tensors(torch.bfloat16))
    assert any(name.startswith("visual.") for name in sent) and all(t.device.type == device.type for t in sent.values())
