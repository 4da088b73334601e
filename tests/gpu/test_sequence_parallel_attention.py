"""The sequence-parallel attention (`rlhf_cluster.models.sequence_parallel`) with each attention it
wraps on each device (`conftest.device`): at one rank (no all-to-all: one GPU) the switched model's
log-probs of packed rows equal the packed path's with the same attention, so the whole rows' masks
(SDPA, FlexAttention's block mask) and varlen runs (varlen, flash-attention) it builds are the
packing's. The CPU half runs SDPA alone (the others have no CPU kernels); the 2-rank equality is
tests/unit/test_sequence_parallel.py's, on gloo."""

from __future__ import annotations

import pytest
import torch

from rlhf_cluster.models.modeling import flash_attn_installed, load_causal_lm, response_logprobs
from rlhf_cluster.models.packing import pack_rows
from rlhf_cluster.models.sequence_parallel import (
    enable_sequence_parallel,
    plan_shard,
    shard_rows,
    sharded_response_logprobs,
)
from rlhf_cluster.models.varlen_attention import VARLEN
from tests.batches import ragged_batch

SHAPES = [(5, 3), (2, 40), (7, 1), (3, 17), (9, 64), (4, 8)]  # (prompt, response): ragged, so packing pays


def _attentions(device: torch.device) -> list[tuple[str, torch.dtype]]:
    if device.type == "cpu":
        return [("sdpa", torch.float32)]
    out = [("sdpa", torch.float32), ("flex_attention", torch.float32), (VARLEN, torch.bfloat16)]
    return out + ([("flash_attention_2", torch.bfloat16)] if flash_attn_installed() else [])


def test_one_rank_equals_the_packed_path_with_each_attention(device, tiny_model_path):
    b = ragged_batch(SHAPES, seed=1)
    args = [t.to(device) for t in (b.input_ids, b.attention_mask, b.prompt_lengths)]
    T, mask = b.response_mask.shape[1], b.response_mask.to(device)
    for attention, dtype in _attentions(device):
        model = load_causal_lm(tiny_model_path, dtype, device, attention)
        with torch.no_grad():
            want, _ = response_logprobs(model, *args, T, packed=True)
            packing = pack_rows(*args, T, attention)
            rows = shard_rows(packing.input_ids(args[0]), packing.position_ids, packing.sequence_ids, 1)
            plan = plan_shard(packing, 1, 0)  # the learner plans it on the host; here on the device
            layout = rows.layout(None, enable_sequence_parallel(model, 1), plan.runs)  # the planned varlen runs
            got, _ = sharded_response_logprobs(model, rows, plan, 0, layout)
        # The same kernel on the same numbers; a varlen call's row tail is cut into other runs
        # (no real token attends to it), which may block the work differently: bf16's rounding.
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        distance = ((got - want) * mask).abs().max().item()
        assert distance <= tolerance, (attention, distance)
        if attention == "sdpa":
            with pytest.raises(ValueError, match="already runs"):
                enable_sequence_parallel(model, 1)
