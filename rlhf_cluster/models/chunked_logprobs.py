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
import logging
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Protocol

import torch

log = logging.getLogger(__name__)

# Tokens per chunk: the working set is two float32 [chunk, vocab] buffers and the chunk's logits in
# the weight's dtype, ~0.8 GB at a vocabulary of 151,936 with 512 bf16 tokens (plus the output
# layer's float32 gradient); a small vocabulary's batch fits in one chunk.
DEFAULT_CHUNK_TOKENS = 512


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[chunk, vocab] logits in the weight's dtype, computed as `nn.Linear` would (so a bf16 model's
    log-probs round as its plain forward's do); read into float32 once, by `_shifted_exp`."""
    return torch.nn.functional.linear(hidden, weight, bias)


def _shifted_exp(z: torch.Tensor, shift: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """((z - shift) * scale, its exp) in float32 for logits `z` [chunk, vocab] in any float dtype
    and a per-row `shift` [chunk] in z's units: two float32 buffers, each written in one pass (the
    subtraction reads `z` in its own dtype and writes float32: no separate cast)."""
    shifted = torch.sub(z, shift[:, None])  # `shift` is float32: the result is too
    if scale != 1.0:
        shifted.mul_(scale)
    return shifted, shifted.exp()


_fused_accumulation = {"cuda": True}  # whether this process's CUDA GEMM accumulates into float32 itself


def _accumulate_weight_grad(acc: torch.Tensor, grad_z: torch.Tensor, hidden: torch.Tensor) -> None:
    """acc [V, H] float32 += grad_z.T @ hidden, a GEMM in `grad_z`'s dtype (tensor cores for bf16)
    summed in float32: on CUDA into `acc` by the GEMM itself (`aten::addmm.dtype_out`, PyTorch >=
    2.8), elsewhere (or where that kernel is missing: logged once) through the product in that dtype."""
    if grad_z.dtype == torch.float32:
        acc.addmm_(grad_z.t(), hidden.float())
        return
    operand = hidden.to(grad_z.dtype)
    if acc.is_cuda and _fused_accumulation["cuda"]:
        try:
            torch.ops.aten.addmm.dtype_out(acc, grad_z.t(), operand, torch.float32, out=acc)
            return
        except (RuntimeError, NotImplementedError, AttributeError) as exc:
            _fused_accumulation["cuda"] = False
            log.warning(
                "the output layer's gradient GEMM cannot accumulate into float32 here (%s): "
                "adding the bf16 product instead",
                exc,
            )
    acc.add_(torch.mm(grad_z.t(), operand))


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """(log p(target), entropy) per row of `hidden` [N, H] under the output layer `weight` [V, H].

    Per chunk, with m the row's largest logit, e = exp(z - m) and s = sum e:
        lse = m + log s,   log p(y) = (z_y - m) - log s,   H = log s - sum(e * (z - m)) / s
    so the forward reads the chunk's logits once into float32 (z - m), once more for e, and (for
    the entropy) once for the dot product; the backward writes the gradient in the weight's dtype
    from p = exp(z - lse) in one pass (two with the entropy's term)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, with_entropy, chunk):
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            z = _chunk_logits(hidden[start:end], weight, bias)
            top = z.amax(dim=-1)
            if top.dtype != torch.float32:
                top = top.float()
            shifted, e = _shifted_exp(z, top, 1.0 / temperature)
            del z
            s = e.sum(dim=-1)
            log_s = s.log()
            torch.add(log_s, top, alpha=1.0 / temperature, out=lse[start:end])
            torch.sub(shifted.gather(1, targets[start:end, None]).squeeze(1), log_s, out=logp[start:end])
            if with_entropy:
                dot = shifted.mul_(e).sum(dim=-1)  # sum e * (z - m) / T, in place of (z - m) / T
                torch.sub(log_s, dot.div_(s), out=entropy[start:end])
            del shifted, e
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature, ctx.chunk, ctx.with_entropy = temperature, chunk, with_entropy
        ctx.set_materialize_grads(False)  # an entropy kept only as a metric sends no gradient: None
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        with_entropy = ctx.with_entropy and grad_entropy is not None
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Accumulated in float32 over the chunks, cast to the weight's dtype once. Each chunk's
        # product runs in the weight's dtype (tensor cores for bf16: a float32 GEMM here was 22% of
        # a 0.5B step's GPU time, issue 54), summed in float32, no coarser than the gradient the
        # layer returns.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        scale = 1.0 / ctx.temperature
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = min(start + ctx.chunk, hidden.shape[0])
            z = _chunk_logits(hidden[start:end], weight, bias)
            shift = lse[start:end] if ctx.temperature == 1.0 else lse[start:end] * ctx.temperature
            log_p, p = _shifted_exp(z, shift, scale)
            del z
            # d logp_y/dz = onehot(y) - p;  d H/dz = -p * (log p + H):  grad_z = g_logp * (onehot - p)
            # - g_H * p * (log p + H), in float32 (the onehot subtracted there: p_y close to 1 must
            # not cancel in a coarser dtype), divided by the temperature and cast once.
            g_logp = grad_logp[start:end, None]
            if with_entropy:
                coef = log_p.add_(entropy[start:end, None]).mul_(grad_entropy[start:end, None]).add_(g_logp)
                grad_z = coef.mul_(p).neg_()
                grad_z.scatter_add_(1, targets[start:end, None], g_logp)
                del p
                if scale != 1.0:
                    grad_z.mul_(scale)
                g = grad_z.to(weight.dtype)
                del grad_z
            else:
                del log_p
                p.scatter_add_(1, targets[start:end, None], torch.full_like(g_logp, -1.0))  # p - onehot
                g = torch.empty(p.shape, dtype=weight.dtype, device=p.device)
                torch.mul(p, g_logp * -scale, out=g)
                del p
            if need_hidden:
                grad_hidden[start:end] = g @ weight
            if need_weight:
                _accumulate_weight_grad(grad_weight, g, hidden[start:end])
            if need_bias:
                grad_bias.add_(g.sum(0, dtype=torch.float32))
            del g
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


# A head: `token_logprobs`' signature and results. `scored_positions` runs the one `logprob_head`
# set, `token_logprobs` where none is (a learner's choice of `learner.logprob_head`, `fused_logprobs`).
TokenHead = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
_head: ContextVar[TokenHead | None] = ContextVar("logprob_head", default=None)


@contextlib.contextmanager
def logprob_head(head: TokenHead) -> Iterator[None]:
    """While active, `scored_positions` scores with `head` in place of `token_logprobs`."""
    token = _head.set(head)
    try:
        yield
    finally:
        _head.reset(token)


class _CausalLM(Protocol):
    """A Hugging Face causal LM, or a wrapper that forwards to one (a DeepSpeed engine, a peft model)."""

    def get_output_embeddings(self) -> torch.nn.Module | None: ...


class _ScoredPositions:
    """The output layer's forward while `scored_positions` is active, and how to read its output."""

    def __init__(
        self,
        positions: torch.Tensor,
        targets: torch.Tensor,
        temperature: float,
        with_entropy: bool,
        chunk_tokens: int,
        only: torch.Tensor | None,
    ):
        self.positions, self.targets, self.only = positions, targets, only
        self.temperature, self.with_entropy, self.chunk_tokens = temperature, with_entropy, chunk_tokens
        self.head: TokenHead = _head.get() or token_logprobs

    def forward(self, layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        B, T = self.positions.shape
        positions, targets = self.positions.reshape(-1), self.targets.reshape(-1)
        if self.only is not None:
            positions, targets = positions[self.only], targets[self.only]
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        weight = layer.weight  # read at each call: a sharding backend swaps the gathered weight in
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{type(layer).__name__}.weight is a {type(weight).__name__}, not a tensor")
        logp, entropy = self.head(
            rows,
            weight,
            targets,
            getattr(layer, "bias", None),
            self.temperature,
            self.with_entropy,
            self.chunk_tokens,
        )
        if self.only is not None:  # back to [B * T], 0 at the positions not scored
            logp = logp.new_zeros(B * T).index_copy(0, self.only, logp)
            if entropy is not None:
                entropy = entropy.new_zeros(B * T).index_copy(0, self.only, entropy)
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
    only: torch.Tensor | None = None,
) -> Iterator[_ScoredPositions]:
    """While active, `model`'s output layer returns, instead of logits for every position, the
    log-probs of `targets` [B, T] at `positions` [B, T] of its input (and their entropies), which
    the model passes on as its `logits`: `scored.read(model(...).logits)` gives them. A position is
    an index into the model's outputs flattened over batch and length (row b, position p: b * L + p).
    `only`: the flat indices into [B, T] to score (the responses' real tokens); the others read 0."""
    layer = model.get_output_embeddings()
    if layer is None or not hasattr(layer, "weight"):
        raise TypeError(f"{type(model).__name__}: no output layer with a weight to score tokens with")
    request = _ScoredPositions(positions, targets, temperature, with_entropy, chunk_tokens, only)
    # An instance attribute shadows the class's forward; nn.Module.__call__ (and the hooks a
    # sharding backend registered on the layer) still run around it.
    layer.forward = lambda hidden: request.forward(layer, hidden)
    try:
        yield request
    finally:
        del layer.forward
