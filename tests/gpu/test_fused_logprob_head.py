"""The fused log-prob head (cut-cross-entropy's kernels, `models/fused_logprobs.py`) equals the chunked
head in log-probs, entropies (our Triton kernel) and the gradients of the hidden states and of the
output layer, with a temperature and a per-token upstream gradient. On CUDA: bf16, fp16 and fp32 at
Qwen2.5's output layer (896 x 151,936), and a learner step with each head. On the CPU (`make test`): the same kernels
under Triton's interpreter on CPU tensors, in a subprocess (TRITON_INTERPRET must be set before
Triton is imported), small shapes, fp16 and fp32 (the interpreter multiplies bf16 tiles wrongly,
Triton 3.9); and a learner refusing `fused` there."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_cluster.config import JobConfig
from rlhf_cluster.learner.base import LearnerSpec
from rlhf_cluster.learner.fsdp2 import FSDP2Learner
from rlhf_cluster.models import fused_logprobs as fused
from rlhf_cluster.models.chunked_logprobs import token_logprobs
from tests.batches import ragged_batch
from tests.unit.test_fused_logprobs import _stand_in_entropy, _stand_in_nll
from tests.unit.test_host_syncs import HostReads

ROOT = Path(__file__).resolve().parents[2]

# Relative difference (norm of fused - chunked over the norm of chunked's) allowed per dtype, for
# values and for gradients. bf16/fp16: the chunked head rounds the logits to that dtype (the kernels
# do not) and the kernels' backward sums its tiles' products in that dtype (the chunked head's output
# layer gradient in float32): gradients differ by more than values.
TOLERANCE = {torch.bfloat16: (1e-2, 5e-2), torch.float16: (2e-3, 1e-2), torch.float32: (1e-5, 1e-5)}
NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _reference(hidden, weight, targets, bias, temperature, with_entropy, chunk_tokens):
    """log-probs and entropies in float64 from the whole logits."""
    logp_all = ((hidden.double() @ weight.double().T) / temperature).log_softmax(-1)
    return logp_all.gather(1, targets[:, None]).squeeze(1), -(logp_all.exp() * logp_all).sum(-1)


_HEADS = {"fused": fused.fused_token_logprobs, "chunked": token_logprobs, "fp64": _reference}


def differences(device: torch.device, dtype: torch.dtype, n: int, hidden: int, vocab: int) -> dict[str, float]:
    """The fused head's relative differences from the chunked head (`name`) and of both from a float64
    reference (`name/fused_vs_fp64`, `name/chunked_vs_fp64`), without and with a gradient, how
    often the kernels ran (`kernel_calls`, `entropy_kernel_calls`: a float32 gradient runs the
    chunked head; `entropy_kernel_failed`: the entropy kernel failed) and how many operations of the
    fused head read the device back to the host (`host_reads`)."""
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(n, hidden, generator=g).to(device, dtype)
    w0 = (torch.randn(vocab, hidden, generator=g) * 3 / hidden**0.5).to(device, dtype)  # logits of std ~3
    targets = torch.randint(0, vocab, (n,), generator=g).to(device)
    upstream = (torch.randn(n, generator=g) * (torch.arange(n) % 4 != 0)).to(device)  # some tokens masked
    out: dict[str, float] = {"kernel_calls": 0, "entropy_kernel_calls": 0}
    kernels = {"kernel_calls": fused._kernel_nll, "entropy_kernel_calls": fused._kernel_entropy}

    def counting(key):
        def run(*args):
            out[key] += 1
            return kernels[key](*args)

        return run

    fused._kernel_nll, fused._kernel_entropy = counting("kernel_calls"), counting("entropy_kernel_calls")
    try:
        for grad in (False, True):
            results = {}
            for name, head in _HEADS.items():
                h, w = h0.clone().requires_grad_(grad), w0.clone().requires_grad_(grad)
                with HostReads() if name == "fused" else contextlib.nullcontext() as reads:
                    with torch.set_grad_enabled(grad):
                        logp, entropy = head(h, w, targets, None, 0.7, True, 512)
                    grads = torch.autograd.grad(logp, (h, w), upstream.to(logp.dtype)) if grad else ()
                out["host_reads"] = out.get("host_reads", 0) + len(reads.reads if reads else [])
                results[name] = [t.detach().double() for t in (logp, entropy, *grads)]
            keys = ["logp", "entropy", "grad_hidden", "grad_weight"] if grad else ["logp_no_grad", "entropy_no_grad"]
            for i, key in enumerate(keys):
                f, c, r = results["fused"][i], results["chunked"][i], results["fp64"][i]
                out[key] = ((f - c).norm() / c.norm()).item()
                out[f"{key}/fused_vs_fp64"] = ((f - r).norm() / r.norm()).item()
                out[f"{key}/chunked_vs_fp64"] = ((c - r).norm() / r.norm()).item()
    finally:
        fused._kernel_nll, fused._kernel_entropy = kernels["kernel_calls"], kernels["entropy_kernel_calls"]
    out["entropy_kernel_failed"] = len(fused._entropy_failed)
    return out


def _check(dtype: torch.dtype, diffs: dict[str, float]) -> None:
    values, gradients = TOLERANCE[dtype]
    expected_calls = 1 if dtype == torch.float32 else 2  # float32: only the pass without a gradient
    assert diffs["kernel_calls"] == diffs["entropy_kernel_calls"] == expected_calls, diffs
    assert diffs["entropy_kernel_failed"] == 0, diffs
    assert diffs["host_reads"] == 0, diffs  # the learner reads the device once per update, not per pass
    for key in ("logp", "entropy", "logp_no_grad", "entropy_no_grad"):
        assert diffs[key] <= values, (dtype, key, diffs)
    for key in ("grad_hidden", "grad_weight"):
        assert diffs[key] <= gradients, (dtype, key, diffs)


def interpreted_differences() -> dict[str, dict[str, float]]:
    """`differences` on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 set before
    Triton's import). libdevice (CUDA's math library) has no interpreter implementation: the
    kernels' one use of it, log1p in their log-add-exp, is given as log(1 + x) for this run."""
    global tl  # a jit'd function finds `tl` among its module's globals
    import cut_cross_entropy.tl_utils as tl_utils
    import triton
    import triton.language as tl

    @triton.jit
    def log1p(a):
        return tl.log(1.0 + a)

    tl_utils.tl_log1p = log1p
    cpu = torch.device("cpu")
    return {name: differences(cpu, NAMES[name], n=37, hidden=48, vocab=300) for name in ("float16", "float32")}


_INTERPRETED = """
import json, os
os.environ["TRITON_INTERPRET"] = "1"
from tests.gpu.test_fused_logprob_head import interpreted_differences
print(json.dumps(interpreted_differences()))
"""


def test_fused_head_equals_chunked_head(device):
    # No skip without the package: it is in the dev and gpu extras, and a missing wheel on a GPU
    # machine must fail here rather than leave the only real-kernel check green.
    assert fused.cce_available(), "cut-cross-entropy is not installed (pip install cut-cross-entropy==25.1.1)"
    if device.type == "cuda":
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            diffs = differences(device, dtype, n=2048, hidden=896, vocab=151936)
            print(f"fused vs chunked head, {dtype}: {json.dumps(diffs)}")
            _check(dtype, diffs)
        return
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-c", _INTERPRETED], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for name, diffs in json.loads(run.stdout.strip().splitlines()[-1]).items():
        _check(NAMES[name], diffs)


def test_learner_step_with_the_fused_head(device_group, tiny_model_path, monkeypatch):
    """A bf16 learner step scoring with the fused head (the kernel on CUDA; on the CPU, which refuses
    `fused`, the head chosen as CUDA would with a stand-in for the kernel) equals one with the chunked head."""
    device = device_group

    def learner(head: str) -> FSDP2Learner:
        cfg = JobConfig.model_validate({"learner": {"world_size": 1, "mixed_precision": "bf16", "logprob_head": head}})
        return FSDP2Learner(LearnerSpec.of_policy(cfg), tiny_model_path)

    if device.type == "cuda":
        assert fused.cce_available(), "cut-cross-entropy is not installed (pip install cut-cross-entropy==25.1.1)"
        kernel = fused._kernel_nll
    else:
        with pytest.raises(ValueError, match="learner.logprob_head: fused needs CUDA"):
            learner("fused")
        monkeypatch.setattr(fused, "choose_logprob_head", lambda choice, *_: choice)
        monkeypatch.setattr(fused, "_kernel_entropy", _stand_in_entropy)
        kernel = _stand_in_nll  # Triton's interpreter cannot multiply the bf16 tiles of this step
    calls: list[int] = []
    monkeypatch.setattr(fused, "_kernel_nll", lambda *args: (calls.append(1), kernel(*args))[1])
    batch = ragged_batch([(5, 7), (9, 3), (4, 12), (6, 6)])
    stats = {head: learner(head).train_step(batch, kl_coef=0.01) for head in ("fused", "chunked")}
    assert calls, "the fused learner never ran the kernel"
    got, want = stats["fused"], stats["chunked"]
    assert abs(got["policy/loss"] - want["policy/loss"]) <= 1e-2 * max(1.0, abs(want["policy/loss"])), (got, want)
    assert abs(got["learner/grad_norm"] - want["learner/grad_norm"]) <= 5e-2 * want["learner/grad_norm"], (got, want)
