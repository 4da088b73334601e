"""The fused log-prob head's choice (`learner.logprob_head` per device and installed package) and its
wrapper's maths (temperature, sign, fallbacks, entropy) against the chunked head, with a pure-torch
stand-in for cut-cross-entropy's kernel call; the kernels themselves: tests/gpu/test_fused_logprob_head.py."""

from __future__ import annotations

import logging

import pytest
import torch

from rlhf_cluster.models import fused_logprobs as fused
from rlhf_cluster.models.chunked_logprobs import logprob_head, scored_positions, token_logprobs

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture
def installed(monkeypatch):
    """Set whether cut-cross-entropy imports; every logged-once message logs again."""
    monkeypatch.setattr(fused, "_logged", set())
    monkeypatch.setattr(fused, "_entropy_failed", [])

    def set_installed(value: bool) -> None:
        monkeypatch.setattr(fused, "cce_available", lambda: value)

    return set_installed


def test_auto_is_fused_only_on_cuda_with_the_package(installed):
    installed(True)
    assert fused.choose_logprob_head("auto", CUDA, entropy_gradient=False) == "fused"
    assert fused.choose_logprob_head("auto", CPU, entropy_gradient=False) == "chunked"
    assert fused.logprob_head_for("auto", CUDA, False) is fused.fused_token_logprobs
    assert fused.logprob_head_for("auto", CPU, False) is token_logprobs
    assert fused.choose_logprob_head("chunked", CUDA, entropy_gradient=False) == "chunked"
    installed(False)
    assert fused.choose_logprob_head("auto", CUDA, entropy_gradient=False) == "chunked"
    assert fused.choose_logprob_head("chunked", CPU, entropy_gradient=False) == "chunked"


def test_fused_where_it_cannot_run_is_refused_naming_the_field(installed):
    installed(True)
    with pytest.raises(ValueError, match=r"learner.logprob_head: fused needs CUDA.*runs on cpu"):
        fused.choose_logprob_head("fused", CPU, entropy_gradient=False)
    installed(False)
    with pytest.raises(ValueError, match=r"fused needs cut-cross-entropy, which is not installed"):
        fused.choose_logprob_head("fused", CUDA, entropy_gradient=False)
    with pytest.raises(ValueError, match="auto, chunked or fused"):
        fused.choose_logprob_head("liger", CUDA, entropy_gradient=False)


def test_what_the_kernels_cannot_train_auto_leaves_to_the_chunked_head_and_fused_refuses(installed, caplog):
    """An entropy bonus (its gradient) or float32 weights (the kernels' backward is bf16/fp16): `auto`
    runs the chunked head, saying why once; an explicit `fused` is refused naming the setting."""
    installed(True)
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        assert fused.choose_logprob_head("auto", CUDA, entropy_gradient=True) == "chunked"
        assert fused.choose_logprob_head("auto", CUDA, entropy_gradient=True) == "chunked"
        assert fused.choose_logprob_head("auto", CUDA, False, half_precision=False) == "chunked"
    assert [r.getMessage() for r in caplog.records] == [
        "learner.logprob_head: the chunked head runs: fused cannot give the entropy's gradient that "
        "algorithm.entropy_coef > 0 asks for",
        "learner.logprob_head: the chunked head runs: fused trains through bf16 weights only (its backward "
        "takes bf16/fp16): set learner.mixed_precision: bf16",
    ]
    with pytest.raises(ValueError, match=r"logprob_head: fused cannot give .* algorithm.entropy_coef > 0"):
        fused.choose_logprob_head("fused", CUDA, entropy_gradient=True)
    with pytest.raises(ValueError, match=r"logprob_head: fused trains through bf16 .* learner.mixed_precision: bf16"):
        fused.choose_logprob_head("fused", CUDA, False, half_precision=False)
    assert fused.choose_logprob_head("fused", CUDA, False, half_precision=True) == "fused"


def _stand_in_nll(hidden, weight, targets):
    """What the kernel computes, in plain torch (float32 logits, as the kernel accumulates them)."""
    logits = hidden.float() @ weight.float().T
    return torch.nn.functional.cross_entropy(logits, targets, reduction="none")


def _stand_in_entropy(hidden, weight, temperature):
    """What the entropy kernel computes, in plain torch (float32 logits)."""
    logp_all = ((hidden.float() @ weight.float().T) / temperature).log_softmax(-1)
    return -(logp_all.exp() * logp_all).sum(-1)


def _heads(dtype, grad: bool, bias: bool = False, with_entropy: bool = False, temperature: float = 0.7):
    """(fused, chunked) results: log-probs, entropies, and the gradients of hidden and weight
    under a per-token upstream gradient (some zero, some negative)."""
    g = torch.Generator().manual_seed(0)
    n, h, v = 13, 16, 40
    hidden0 = torch.randn(n, h, generator=g).to(dtype)
    weight0 = (0.5 * torch.randn(v, h, generator=g)).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g) * (torch.arange(n) % 4 != 0)
    out = []
    for head in (fused.fused_token_logprobs, token_logprobs):
        hidden, weight = hidden0.clone().requires_grad_(grad), weight0.clone().requires_grad_(grad)
        logp, entropy = head(hidden, weight, targets, b, temperature, with_entropy)
        grads = torch.autograd.grad(logp, (hidden, weight), upstream) if grad else (None, None)
        out.append((logp, entropy, *grads))
    return out


def test_the_wrapper_equals_the_chunked_head_with_temperature_and_per_token_gradients(installed, monkeypatch):
    monkeypatch.setattr(fused, "_kernel_nll", _stand_in_nll)
    (logp, _, gh, gw), (ref, _, rh, rw) = _heads(torch.bfloat16, grad=True)
    assert logp.dtype == torch.float32 and (logp <= 0).all()
    # bf16: the chunked head rounds the logits to bf16, the stand-in (as the kernel) does not.
    torch.testing.assert_close(logp, ref, atol=0.03, rtol=0.01)
    torch.testing.assert_close(gh.float(), rh.float(), atol=0.02, rtol=0.02)
    torch.testing.assert_close(gw.float(), rw.float(), atol=0.02, rtol=0.02)
    (logp, _, _, _), (ref, _, _, _) = _heads(torch.float32, grad=False)
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=1e-5)


def test_the_entropy_comes_from_its_kernel_without_a_gradient(installed, monkeypatch):
    monkeypatch.setattr(fused, "_kernel_nll", _stand_in_nll)
    monkeypatch.setattr(fused, "_kernel_entropy", _stand_in_entropy)
    (_, entropy, _, _), (_, ref, _, _) = _heads(torch.float32, grad=False, with_entropy=True)
    torch.testing.assert_close(entropy, ref)
    hidden = torch.randn(5, 8, dtype=torch.bfloat16, requires_grad=True)  # bf16: the fused path with a gradient
    weight = torch.randn(11, 8, dtype=torch.bfloat16)
    logp, entropy = fused.fused_token_logprobs(hidden, weight, torch.arange(5), with_entropy=True)
    assert logp.requires_grad and not entropy.requires_grad  # a metric: an entropy bonus runs the chunked head


def test_an_entropy_kernel_that_fails_is_replaced_by_the_chunked_forward_once(installed, monkeypatch, caplog):
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("no kernel here")

    monkeypatch.setattr(fused, "_kernel_nll", _stand_in_nll)
    monkeypatch.setattr(fused, "_kernel_entropy", broken)
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        for _ in range(2):
            (_, entropy, _, _), (_, ref, _, _) = _heads(torch.float32, grad=False, with_entropy=True)
            assert torch.equal(entropy, ref)
    assert calls == [1] and fused._entropy_failed and "no kernel here" in caplog.records[0].getMessage()


def test_what_the_kernels_cannot_serve_runs_the_chunked_head_logged_once(installed, monkeypatch, caplog):
    def refuse(*args):
        raise AssertionError("the kernel ran a case it cannot serve")

    monkeypatch.setattr(fused, "_kernel_nll", refuse)
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        for _ in range(2):
            (logp, _, gh, gw), (ref, _, rh, rw) = _heads(torch.float32, grad=True)  # a float32 gradient
            assert torch.equal(logp, ref) and torch.equal(gh, rh) and torch.equal(gw, rw)
        (logp, _, _, _), (ref, _, _, _) = _heads(torch.float32, grad=False, bias=True)
        assert torch.equal(logp, ref)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "float32" in messages[0] and "bias" in messages[1]
    logp, _ = fused.fused_token_logprobs(torch.zeros(0, 4), torch.zeros(3, 4), torch.zeros(0, dtype=torch.long))
    assert logp.shape == (0,)


def test_scored_positions_runs_the_head_set_and_only_while_it_is_set():
    calls = []

    def head(hidden, weight, targets, bias, temperature, with_entropy, chunk_tokens):
        calls.append(hidden.shape[0])
        return token_logprobs(hidden, weight, targets, bias, temperature, with_entropy, chunk_tokens)

    model = _OneLayer()
    positions, targets = torch.tensor([[0, 1]]), torch.tensor([[2, 3]])
    with logprob_head(head), scored_positions(model, positions, targets) as scored:
        with_head, _ = scored.read(model(torch.randn(1, 2, 4)))
    with scored_positions(model, positions, targets) as scored:
        scored.read(model(torch.randn(1, 2, 4)))
    assert calls == [2] and with_head.shape == (1, 2)


class _OneLayer(torch.nn.Module):
    """A model whose output layer is its only layer."""

    def __init__(self):
        super().__init__()
        self.lm_head = torch.nn.Linear(4, 5, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, hidden):
        return self.lm_head(hidden)
