"""Log-probs (and entropies) of chosen tokens from final hidden states, a chunk of tokens at a time.

The plain path, `lm_head(hidden)` for every position and a log-softmax over it, holds a
[tokens, vocab] tensor several times over (the logits, their float32 copy, the log-softmax, its
exp for the entropy, and as many again for the backward). At a vocabulary of 151,936 that is
~0.6 MB per token per tensor: tens of GB for an RL batch, most of a step's memory traffic (issue 35).

Here the output layer runs only at the positions that are scored, `chunk_tokens` of them at a
time; each chunk's logits live only while that chunk is reduced to a log-sum-exp, the chosen
token's log-prob and (when asked) the entropy. The backward recomputes a chunk's logits from the
saved hidden states instead of keeping them, so peak memory is one chunk's [chunk, vocab] working
set whatever the batch, for one extra output-layer matmul.

Gradients (z: a position's logits after the temperature, p = softmax(z), y: the chosen token):
    d logp_y / dz = onehot(y) - p
    d H / dz      = -p * (log p + H)        with H = -sum p log p
and d/dlogits = (d/dz) / temperature.

The head runs *inside* the output layer's own forward (`scored_positions`), so a sharded backend
(FSDP2, DeepSpeed ZeRO-3) has gathered the layer's weight exactly as for the plain `nn.Linear`,
and saves it for the backward the same way `F.linear` does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch

# Tokens per chunk: the working set is two float32 [chunk, vocab] buffers, ~0.6 GB at a vocabulary
# of 151,936 with 512 tokens (plus the output layer's float32 gradient); a small vocabulary's batch
# fits in one chunk.
DEFAULT_CHUNK_TOKENS = 512


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """float32 [chunk, vocab] logits / temperature, computed in the weight's dtype as `nn.Linear`
    would (so a bf16 model's log-probs round as its plain forward's do)."""
    z = torch.nn.functional.linear(hidden, weight, bias).float()
    if temperature != 1.0:
        z.div_(temperature)  # z is this call's own tensor: no second [chunk, vocab] buffer
    return z


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """(log p(target), entropy) per row of `hidden` [N, H] under the output layer `weight` [V, H]."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, with_entropy, chunk):
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            z = _chunk_logits(hidden[start:end], weight, bias, temperature)
            chunk_lse = torch.logsumexp(z, dim=-1)
            lse[start:end] = chunk_lse
            logp[start:end] = z.gather(1, targets[start:end, None]).squeeze(1) - chunk_lse
            if with_entropy:
                # H = -sum p log p, as a row-wise dot product: one [chunk, vocab] buffer besides z.
                log_p = z.sub_(chunk_lse[:, None])
                p = log_p.exp()
                entropy[start:end] = -torch.bmm(p[:, None, :], log_p[:, :, None]).view(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature, ctx.chunk, ctx.with_entropy = temperature, chunk, with_entropy
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Accumulated in float32 over the chunks, cast to the weight's dtype once. Each chunk's
        # product runs in the weight's dtype (tensor cores for bf16: a float32 GEMM here was 22% of
        # a 0.5B step's GPU time, issue 54), summed in float32 inside the GEMM and rounded to that
        # dtype once per chunk, no coarser than the gradient the layer returns.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = min(start + ctx.chunk, hidden.shape[0])
            z = _chunk_logits(hidden[start:end], weight, bias, ctx.temperature)
            # Two [chunk, vocab] buffers: z (log p, then the gradient, in place) and p.
            log_p = z.sub_(lse[start:end, None])
            p = log_p.exp()
            g_logp = grad_logp[start:end, None]
            if ctx.with_entropy:  # g_logp + g_entropy * (log p + H)
                coef = log_p.add_(entropy[start:end, None]).mul_(grad_entropy[start:end, None]).add_(g_logp)
            else:
                coef = log_p.copy_(g_logp.expand_as(log_p))
            grad_z = coef.mul_(p).neg_()  # -p * coef; the onehot's g_logp is added below
            del p
            grad_z.scatter_add_(1, targets[start:end, None], g_logp)
            if ctx.temperature != 1.0:
                grad_z.div_(ctx.temperature)
            g = grad_z.to(weight.dtype)
            if need_hidden:
                grad_hidden[start:end] = g @ weight
            if need_weight:
                if weight.dtype == torch.float32:
                    grad_weight.addmm_(grad_z.t(), hidden[start:end].float())
                else:
                    grad_weight.add_(torch.mm(g.t(), hidden[start:end].to(weight.dtype)))
            if need_bias:
                grad_bias.add_(grad_z.sum(0))
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
            None,
            None,
        )


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 log p(targets[i] | hidden[i]) for hidden [N, H] (and the entropies when asked), with
    the output layer `weight` [V, H] (+ `bias`), never holding more than `chunk_tokens` rows of logits."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    logp, entropy = _ChunkedTokenLogprobs.apply(
        hidden, weight, bias, targets, float(temperature), with_entropy, int(chunk_tokens)
    )
    return logp, (entropy if with_entropy else None)


class _CausalLM(Protocol):
    """A Hugging Face causal LM, or a wrapper that forwards to one (a DeepSpeed engine, a peft model)."""

    def get_output_embeddings(self) -> torch.nn.Module | None: ...


class _ScoredPositions:
    """The output layer's forward while `scored_positions` is active, and how to read its output."""

    def __init__(
        self, positions: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool, chunk_tokens: int
    ):
        self.positions, self.targets = positions, targets
        self.temperature, self.with_entropy, self.chunk_tokens = temperature, with_entropy, chunk_tokens

    def forward(self, layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        B, T = self.positions.shape
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.positions.reshape(-1))
        weight = layer.weight  # read at each call: a sharding backend swaps the gathered weight in
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{type(layer).__name__}.weight is a {type(weight).__name__}, not a tensor")
        logp, entropy = token_logprobs(
            rows,
            weight,
            self.targets.reshape(-1),
            getattr(layer, "bias", None),
            self.temperature,
            self.with_entropy,
            self.chunk_tokens,
        )
        # Returned in place of the logits, and read from the model's output: the gradient must
        # flow through the layer's own output, where ZeRO-3 and FSDP hook their backward.
        # (Stacked: a new tensor, not a view, which a sharding backend's output hooks would warn about.)
        parts = [logp.view(B, T)] + ([entropy.view(B, T)] if entropy is not None else [])  # None: not asked
        return torch.stack(parts, -1)

    def read(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log-probs [B, T], entropies [B, T] or None) from what the model returned as `logits`."""
        return output[..., 0], (output[..., 1] if self.with_entropy else None)


@contextlib.contextmanager
def scored_positions(
    model: _CausalLM,
    positions: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> Iterator[_ScoredPositions]:
    """While active, `model`'s output layer returns, instead of logits for every position, the
    log-probs of `targets` [B, T] at `positions` [B, T] of its input (and their entropies), which
    the model passes on as its `logits`: `scored.read(model(...).logits)` gives them. A position is
    an index into the model's outputs flattened over batch and length (row b, position p: b * L + p)."""
    layer = model.get_output_embeddings()
    if layer is None or not hasattr(layer, "weight"):
        raise TypeError(f"{type(model).__name__}: no output layer with a weight to score tokens with")
    request = _ScoredPositions(positions, targets, temperature, with_entropy, chunk_tokens)
    # An instance attribute shadows the class's forward; nn.Module.__call__ (and the hooks a
    # sharding backend registered on the layer) still run around it.
    layer.forward = lambda hidden: request.forward(layer, hidden)
    try:
        yield request
    finally:
        del layer.forward
