"""Varlen attention: PyTorch's own flash kernels over packed rows (`learner.attention: varlen`).

Packed, every sequence of a micro-batch shares one row (`packing.row_tokens_for`), and
`torch.nn.attention.varlen.varlen_attn` (PyTorch >= 2.10, no extra wheel) runs causal attention
within each sequence from the cumulative lengths `cu_seqlens` the host planned with the packing
(`PackedRows.cu_seqlens`): attention costs each sequence its own length squared, nothing is padded
and no mask is built. The function is registered with transformers' `AttentionInterface` under
`VARLEN`, so a model loaded with `attn_implementation="varlen"` calls it from every attention layer;
transformers builds no mask for a name its mask interface does not know.

The kernels are CUDA only (on the CPU `aten::_flash_attention_forward` has no kernel), half
precision only (fp16, bf16) and take head sizes that are multiples of 8 up to 256 (`runs_for`).
"""

from __future__ import annotations

import inspect

import torch

VARLEN = "varlen"  # the attention implementation's name, in the config and in AttentionInterface
MAX_HEAD_DIM = 256
HALF_DTYPES = (torch.float16, torch.bfloat16)


def installed() -> bool:
    """Whether this torch has `varlen_attn` (PyTorch >= 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def runs_for(dtype: torch.dtype | None, head_dim: int | None) -> bool:
    """Whether the flash kernels behind `varlen_attn` take this compute dtype and head size
    (fp16/bf16; a multiple of 8 up to 256). Unknown (None) is no: the rule cannot promise it runs."""
    if dtype is None or head_dim is None:
        return False
    return dtype in HALF_DTYPES and head_dim % 8 == 0 and 0 < head_dim <= MAX_HEAD_DIM


def register() -> None:
    """`VARLEN` in transformers' attention interface (idempotent): models loaded with it, or whose
    config is switched to it, call `varlen_attention_forward`."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)


def cu_seqlens_of(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32 [N+1], longest) of rows [B, S] whose position ids restart at 0 for each
    sequence (a padded row, counting 0..S-1, is one sequence). Reads the device for the longest:
    only for callers that did not plan the packing on the host (`PackedRows.cu_seqlens`)."""
    B, S = position_ids.shape
    starts = position_ids == 0
    starts[:, 0] = True  # every row starts a sequence
    first = starts.reshape(-1).nonzero().squeeze(1)
    cu = torch.cat([first, first.new_tensor([B * S])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def flash_varlen(q, k, v, cu_seqlens, max_seqlen, scale, window_size, enable_gqa):
    """The kernel: causal (or causal sliding-window) attention of packed [tokens, heads, head_dim]
    sequences. One place to call it, so the CPU tests can stand a reference in for it."""
    from torch.nn.attention.varlen import varlen_attn

    cu, longest = cu_seqlens, max_seqlen
    if "enable_gqa" in inspect.signature(varlen_attn).parameters:
        return varlen_attn(
            q, k, v, cu, cu, longest, longest, scale=scale, window_size=window_size, enable_gqa=enable_gqa
        )
    # torch 2.11's kernel has no grouped-query switch, nor takes the word (on one H200, 2026-11-28; a vision
    # tower's call without grouped queries failed there too): the kv heads repeated where there are groups
    if enable_gqa:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale, window_size=window_size)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [B, H, S, D], key and value [B, Hkv, S, D]
    in, [B, S, H, D] out. The sequences are `cu_seq_lens_q` / `max_length_q` where the caller passes
    them (flash-attention's keyword names; `PackedRows.varlen_kwargs`), else found from the position
    ids (a padded row is one sequence: right padding under a causal mask leaves its real tokens
    exact). `attention_mask` is not read: a 2D padding mask never reaches here (transformers builds
    none for this implementation) and the sequences already say who attends to whom. Causal unless
    the call or the layer says otherwise (`is_causal`): a vision tower's attention is bidirectional
    within each image, which once ran causal here on CUDA (tests/gpu, one H200, 2026-11-28)."""
    if dropout:
        raise ValueError(f"varlen attention: no dropout (got {dropout}); train with attention_dropout 0")
    B, H, S, D = query.shape
    cu, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None or longest is None:
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(S, device=query.device).expand(B, S)
        cu, longest = cu_seqlens_of(position_ids.expand(B, S))
    if not kwargs.get("is_causal", getattr(module, "is_causal", True)):
        if sliding_window is not None:
            raise ValueError("varlen attention: a sliding window is causal here; this layer asks for bidirectional")
        window = (-1, -1)  # every token of a sequence sees all of it: a vision tower's patches
    else:
        window = (-1, 0) if sliding_window is None else (sliding_window - 1, 0)
    out = flash_varlen(
        query.transpose(1, 2).reshape(B * S, H, D),
        key.transpose(1, 2).reshape(B * S, key.shape[1], D),
        value.transpose(1, 2).reshape(B * S, value.shape[1], D),
        cu,
        int(longest),
        scaling,
        window,
        key.shape[1] != H,
    )
    return out.view(B, S, H, D), None
