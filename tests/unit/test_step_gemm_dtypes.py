"""Every GEMM of a bf16 mixed-precision learner step runs in bf16 (tensor cores on a GPU), except
the float32 ones the design names (issue 54: a float32 GEMM in the chunked log-prob backward was
22% of a 0.5B step's GPU time on an H100).

A dispatch mode logs each matrix product's operand dtypes and shapes during one FSDP2 step with
`learner.mixed_precision: bf16` on the CPU; the dispatch is the same on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlhf_cluster.config import JobConfig
from rlhf_cluster.learner.base import LearnerSpec
from rlhf_cluster.learner.fsdp2 import FSDP2Learner
from rlhf_cluster.models.chunked_logprobs import token_logprobs
from tests.batches import ragged_batch

# Matrix products as dispatched (`linear` and `matmul` arrive as these), in-place forms included.
GEMMS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::baddbmm_", "aten::addbmm",
         "aten::addbmm_", "aten::mv", "aten::addmv", "aten::addmv_", "aten::_int_mm"}
ADDED_INPUT = {"aten::addmm", "aten::addmm_", "aten::baddbmm", "aten::baddbmm_", "aten::addbmm", "aten::addbmm_",
               "aten::addmv", "aten::addmv_"}


def named_float32_gemm(name: str, shapes: list[tuple[int, ...]]) -> str | None:
    """Why a float32 product is by design, or None.

    - the rotary embedding's angle table: inverse frequencies [B, d/2, 1] x positions [B, 1, L],
      computed in float32 by the model itself (a rank-1 product, no tensor-core work);
    - the chunked entropy's row-wise dot products, [n, 1, V] x [n, V, 1] (memory-bound: a dot
      product per row over float32 probabilities).
    """
    if name in ("aten::bmm", "aten::mm") and len(shapes) == 2:
        a, b = shapes
        if len(a) == 3 and a[2] == 1 and b[1] == 1:
            return "rotary angles"
        if len(a) == 3 and a[1] == 1 and b[2] == 1:
            return "entropy dot products"
    return None


class GemmDtypes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple[torch.dtype, ...], list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in GEMMS:
            operands = [a for a in args if isinstance(a, torch.Tensor)]
            if name in ADDED_INPUT:
                operands = operands[1:3]  # the two factors, not the added input
            self.calls.append((name, tuple(t.dtype for t in operands), [tuple(t.shape) for t in operands]))
        return func(*args, **(kwargs or {}))

    def unnamed_float32(self) -> list:
        return [c for c in self.calls if torch.float32 in c[1] and named_float32_gemm(c[0], c[2]) is None]


def test_a_bf16_step_runs_no_float32_gemm_the_design_does_not_name(gloo_group, tiny_model_path):
    cfg = JobConfig.model_validate({
        "learner": {"world_size": 1, "mixed_precision": "bf16"},
        "algorithm": {"kl": {"placement": "loss", "coef": 0.1}},
    })
    learner = FSDP2Learner(LearnerSpec.of_policy(cfg), tiny_model_path)
    batch = ragged_batch([(3 + i % 3, 2 + (5 * i) % 7) for i in range(6)], seed=0)
    learner.train_step(batch, kl_coef=0.1)  # lazy initialisation
    with GemmDtypes() as mode:
        metrics = learner.train_step(batch, kl_coef=0.1)
    assert metrics["learner/skipped_updates"] == 0
    bf16 = [c for c in mode.calls if c[1] and all(d == torch.bfloat16 for d in c[1])]
    assert len(bf16) > 20, mode.calls  # forward and backward of every projection, the output layer's too
    assert mode.unnamed_float32() == []


@pytest.mark.parametrize("with_entropy", [False, True])
def test_the_output_layers_chunked_backward_runs_in_the_weights_dtype(with_entropy):
    """The product that was float32: the output layer's weight gradient, summed over chunks."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 32, generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(96, 32, generator=g) * 0.1).bfloat16().requires_grad_()
    targets = torch.randint(0, 96, (40,), generator=g)
    with GemmDtypes() as mode:
        logp, entropy = token_logprobs(hidden, weight, targets, with_entropy=with_entropy, chunk_tokens=16)
        (logp.sum() + (entropy.sum() if entropy is not None else 0)).backward()
    assert mode.unnamed_float32() == [], mode.calls
    assert weight.grad.dtype == torch.bfloat16
    # Against the float32 full-logits gradient: within bf16's rounding.
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    log_p = (h32 @ w32.t()).log_softmax(-1)
    loss = log_p.gather(1, targets[:, None]).sum()
    if with_entropy:
        loss = loss - (log_p.exp() * log_p).sum()
    loss.backward()
    rel = (weight.grad.float() - w32.grad).norm() / w32.grad.norm()
    assert rel < 2e-2, rel
