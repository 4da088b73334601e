"""Log-probs and entropies from the chunked output layer (rlhf_cluster/models/chunked_logprobs.py) equal
a float64 log-softmax over full logits, in value and gradient, and never hold [tokens, vocab]."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhf_cluster.models.chunked_logprobs import scored_positions, token_logprobs
from rlhf_cluster.config import TinyModelConfig
from rlhf_cluster.models.modeling import load_causal_lm, response_logprobs
from rlhf_cluster.models.tiny_model import ensure_tiny_model


def _reference(hidden, weight, bias, targets, temperature):
    """float64 log p(target) and entropy through the whole [N, vocab] log-softmax."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    log_p = (z / temperature).log_softmax(-1)
    return log_p.gather(1, targets[:, None]).squeeze(1), -(log_p.exp() * log_p).sum(-1)


@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_bias", [False, True])
def test_values_and_gradients_equal_a_float64_log_softmax(chunk, temperature, with_bias):
    torch.manual_seed(0)
    n, h, v = 37, 16, 50
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    bias = torch.randn(v, requires_grad=True) if with_bias else None
    targets = torch.randint(0, v, (n,))
    g_logp, g_ent = torch.randn(n), torch.randn(n)
    params = [hidden, weight] + ([bias] if with_bias else [])

    logp, entropy = token_logprobs(hidden, weight, targets, bias, temperature, with_entropy=True, chunk_tokens=chunk)
    got = torch.autograd.grad((logp * g_logp).sum() + (entropy * g_ent).sum(), params)
    ref_logp, ref_ent = _reference(hidden, weight, bias, targets, temperature)
    want = torch.autograd.grad((ref_logp * g_logp.double()).sum() + (ref_ent * g_ent.double()).sum(), params)

    assert logp.dtype == entropy.dtype == torch.float32
    assert torch.allclose(logp.double(), ref_logp, atol=1e-5)
    assert torch.allclose(entropy.double(), ref_ent, atol=1e-5)
    for name, a, b in zip(["hidden", "weight", "bias"], got, want):
        assert torch.allclose(a, b, atol=1e-4), (name, (a - b).abs().max())


def test_log_probs_alone_have_the_log_softmax_gradient():
    torch.manual_seed(1)
    hidden, weight = torch.randn(9, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    targets = torch.randint(0, 30, (9,))
    logp, entropy = token_logprobs(hidden, weight, targets, chunk_tokens=4)
    assert entropy is None
    got = torch.autograd.grad(logp.sum(), [hidden, weight])
    want = torch.autograd.grad(_reference(hidden, weight, None, targets, 1.0)[0].sum(), [hidden, weight])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want))


def test_an_entropy_kept_as_a_metric_sends_no_gradient():
    """Entropies computed beside the log-probs but left out of the loss (entropy_coef 0): the
    log-probs' own gradient, the entropy's term skipped rather than multiplied by zeros."""
    torch.manual_seed(4)
    hidden, weight = torch.randn(11, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    targets = torch.randint(0, 30, (11,))
    g = torch.randn(11)
    logp, entropy = token_logprobs(hidden, weight, targets, temperature=0.8, with_entropy=True, chunk_tokens=4)
    assert entropy is not None and entropy.requires_grad
    got = torch.autograd.grad((logp * g).sum(), [hidden, weight])
    want = torch.autograd.grad((_reference(hidden, weight, None, targets, 0.8)[0] * g.double()).sum(), [hidden, weight])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want))


@pytest.mark.parametrize("with_entropy", [False, True])
def test_bf16_gradients_are_the_float64_ones_rounded_once(with_entropy):
    """A bf16 layer's gradients (products in bf16, summed in float32) are within bf16's rounding of
    float64's, and a chosen token of probability close to 1 keeps its small gradient (onehot - p is
    taken in float32, not after rounding p)."""
    torch.manual_seed(5)
    n, h, v = 24, 32, 64
    hidden = torch.randn(n, h).bfloat16().requires_grad_()
    weight = (torch.randn(v, h) * 0.3).bfloat16()
    weight[7] = hidden.detach()[0] * 4  # token 7 at row 0: p close to 1
    weight.requires_grad_()
    targets = torch.randint(0, v, (n,))
    targets[0] = 7
    g_logp, g_ent = torch.randn(n), torch.randn(n)
    logp, entropy = token_logprobs(hidden, weight, targets, with_entropy=with_entropy, chunk_tokens=10)
    loss = (logp * g_logp).sum() + ((entropy * g_ent).sum() if with_entropy else 0)
    got = torch.autograd.grad(loss, [hidden, weight])
    ref_logp, ref_ent = _reference(hidden.float(), weight.float(), None, targets, 1.0)
    ref_loss = (ref_logp * g_logp.double()).sum() + ((ref_ent * g_ent.double()).sum() if with_entropy else 0)
    want = torch.autograd.grad(ref_loss, [hidden, weight])
    assert ref_logp[0] > -0.01  # the check can fail: p_y close to 1
    for name, a, b in zip(["hidden", "weight"], got, want):
        assert a.dtype == torch.bfloat16
        err = (a.double() - b).abs().max() / b.abs().max()
        assert err < 2e-2, (name, err)


def test_bf16_weights_round_as_the_plain_layer_does():
    """A bf16 layer's logits are rounded to bf16 before the float32 log-softmax, as `lm_head(h).float()`:
    the figures agree to float32 rounding (not to bf16's 1e-2)."""
    torch.manual_seed(2)
    hidden, weight = torch.randn(12, 32).bfloat16(), torch.randn(40, 32).bfloat16()
    targets = torch.randint(0, 40, (12,))
    logp, _ = token_logprobs(hidden, weight, targets, chunk_tokens=5)
    plain = torch.nn.functional.linear(hidden, weight).float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    assert torch.allclose(logp, plain, atol=1e-5, rtol=0)
    assert not torch.allclose(logp, plain.bfloat16().float(), atol=1e-5, rtol=0)  # bf16 output would differ


def test_no_tensor_of_tokens_by_vocabulary_is_saved_for_backward():
    """What autograd keeps between forward and backward is the hidden states and one float per token:
    the full path keeps several [tokens, vocab] tensors (here 4,096 x 8,000 float32, 131 MB each)."""
    n, h, v = 4096, 16, 8000
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    targets = torch.randint(0, v, (n,))

    def saved_bytes(fn) -> int:
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.data_ptr()] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(seen.values())

    chunked = saved_bytes(lambda: token_logprobs(hidden, weight, targets, with_entropy=True, chunk_tokens=512))
    full = saved_bytes(lambda: _reference(hidden.float(), weight, None, targets, 1.0))
    logits_bytes = n * v * 4
    assert chunked < logits_bytes / 8, chunked
    assert full > logits_bytes, full  # the check can fail: the full path keeps them


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = ensure_tiny_model(TinyModelConfig(), str(tmp_path_factory.mktemp("models")))
    return load_causal_lm(path)


def test_response_logprobs_equal_the_full_logits_path_on_a_model(tiny_model):
    torch.manual_seed(3)
    chunked_model, full_model = tiny_model, copy.deepcopy(tiny_model)
    vocab = tiny_model.config.vocab_size
    input_ids = torch.randint(0, vocab, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    prompt_lengths = torch.tensor([4, 3, 5])
    a, a_ent = response_logprobs(chunked_model, input_ids, attention_mask, prompt_lengths, 6, 0.8, True, chunk_tokens=4)
    b, b_ent = response_logprobs(full_model, input_ids, attention_mask, prompt_lengths, 6, 0.8, True, chunk_tokens=None)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a_ent, b_ent, atol=1e-5)
    (a.sum() + a_ent.sum()).backward()
    (b.sum() + b_ent.sum()).backward()
    for (name, p), q in zip(chunked_model.named_parameters(), full_model.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name
    chunked_model.zero_grad()


def test_the_output_layer_is_itself_again_after_scoring_even_on_error(tiny_model):
    layer = tiny_model.get_output_embeddings()
    positions = targets = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="boom"):
        with scored_positions(tiny_model, positions, targets):
            assert "forward" in vars(layer)
            raise RuntimeError("boom")
    assert "forward" not in vars(layer)
    hidden = torch.randn(2, layer.weight.shape[1])
    assert layer(hidden).shape == (2, layer.weight.shape[0])


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="chunk_tokens"):
        token_logprobs(torch.randn(2, 3), torch.randn(4, 3), torch.zeros(2, dtype=torch.long), chunk_tokens=0)
