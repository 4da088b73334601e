"""Entropies of the output layer's softmax per row, by a Triton kernel that never writes the logits.

The fused log-prob head (`fused_logprobs`) gets log-probs from cut-cross-entropy's kernels, which
give no entropy; the learner reads the entropy as a metric on every training pass. Here each
program takes `BLOCK_B` rows and one of `splits` slices of the vocabulary, computes its tiles of
logits z = (hidden @ weight.T) / T in registers (float32 accumulation) and keeps per row, online:
    m = max z,   s = sum exp(z - m),   t = sum exp(z - m) * z
The slices' (m, s, t) are merged in torch (rescaled to the largest m), and
    H = -sum p log p = m + log s - t / s.
No gradient (an entropy bonus runs the chunked head, `choose_logprob_head`). Imported only where the
fused head runs: it needs Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_B, BLOCK_V, BLOCK_D = 64, 128, 64


@triton.jit
def _entropy_parts(
    E,
    C,
    M,
    S,
    T,
    n_rows,
    n_vocab,
    dim,
    per_split,
    stride_eb,
    stride_cv,
    scale,
    BLOCK_B: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    split = tl.program_id(1)
    row_ok = rows < n_rows
    m = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_B,), tl.float32)
    t = tl.zeros((BLOCK_B,), tl.float32)
    start = split * per_split
    for v0 in range(start, tl.minimum(start + per_split, n_vocab), BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = (cols < n_vocab) & (cols < start + per_split)
        acc = tl.zeros((BLOCK_B, BLOCK_V), tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            e_ok = row_ok[:, None] & (ds[None, :] < dim)
            c_ok = col_ok[None, :] & (ds[:, None] < dim)
            # 64-bit offsets: a [vocab, hidden] weight may hold more than 2**31 elements
            e = tl.load(E + rows[:, None].to(tl.int64) * stride_eb + ds[None, :], mask=e_ok, other=0.0)
            c = tl.load(C + cols[None, :].to(tl.int64) * stride_cv + ds[:, None], mask=c_ok, other=0.0)
            acc = tl.dot(e, c, acc, input_precision=PRECISION)
        z = tl.where(col_ok[None, :], acc * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        s = s * alpha + tl.sum(p, 1)
        t = t * alpha + tl.sum(p * tl.where(col_ok[None, :], z, 0.0), 1)
        m = m_new
    out = split * n_rows + rows
    tl.store(M + out, m, mask=row_ok)
    tl.store(S + out, s, mask=row_ok)
    tl.store(T + out, t, mask=row_ok)


def softmax_entropy(hidden: torch.Tensor, weight: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """float32 entropy of softmax(weight @ hidden[i] / temperature) per row of hidden [N, H], weight
    [V, H] (both in one dtype, row-major), without a gradient."""
    hidden, weight = hidden.detach().contiguous(), weight.detach().contiguous()
    n, dim = hidden.shape
    vocab = weight.shape[0]
    # Enough programs to fill a GPU at a short micro-batch: the vocabulary in slices of whole tiles.
    splits = max(1, min(triton.cdiv(vocab, BLOCK_V), triton.cdiv(512, triton.cdiv(n, BLOCK_B))))
    per_split = triton.cdiv(triton.cdiv(vocab, splits), BLOCK_V) * BLOCK_V
    splits = triton.cdiv(vocab, per_split)
    m, s, t = (torch.empty(splits, n, dtype=torch.float32, device=hidden.device) for _ in range(3))
    grid = (triton.cdiv(n, BLOCK_B), splits)
    # float32 tiles in TF32 only where torch's own float32 matmuls may use it (as cut-cross-entropy does)
    precision = "tf32" if torch.get_float32_matmul_precision() == "high" else "ieee"
    _entropy_parts[grid](
        hidden,
        weight,
        m,
        s,
        t,
        n,
        vocab,
        dim,
        per_split,
        hidden.stride(0),
        weight.stride(0),
        1.0 / temperature,
        BLOCK_B=BLOCK_B,
        BLOCK_V=BLOCK_V,
        BLOCK_D=BLOCK_D,
        PRECISION=precision,
    )
    top = m.amax(0)
    scale = (m - top).exp()
    total = (s * scale).sum(0)
    return top + total.log() - (t * scale).sum(0) / total
