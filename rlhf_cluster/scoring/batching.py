"""How many tokens one frozen-model forward takes (`scoring.max_tokens_per_batch`).

`auto` (the default): on a CPU 8,192, what every CPU figure of the scoring pool was measured with;
on a GPU as many as fit in half the device memory free once the models are loaded, by what a
no-grad forward holds per token at its peak (one decoder layer's activations: the residual
stream, the normed input, q/k/v and the attention output, the MLP's gate, up and their product;
the log-prob head runs in chunks of its own), between 8,192 and 65,536. On one H100 the 0.5B
reference forward used 3.5% of the chip with 8,192-token batches (issue 56): each forward too
small to fill it. A forward that runs out of memory all the same halves the budget and goes again
(`ReferenceModel.logprobs`).
"""

from __future__ import annotations

import torch

CPU_TOKENS = 8192
GPU_MAX_TOKENS = 65536
MEMORY_SHARE = 0.5


def activation_bytes_per_token(config, dtype_bytes: int) -> int:
    """Peak bytes one token holds in a no-grad forward of a decoder of this `config` (HF's)."""
    hidden, inner = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = 2 * getattr(config, "num_key_value_heads", heads) * head_dim
    return dtype_bytes * (4 * hidden + kv + 3 * inner)


def tokens_per_batch(setting: int | str, device: torch.device, configs: list, dtype_bytes: int) -> int:
    """The token budget for `setting` (a number, or `auto`) on `device` for models of `configs`."""
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return CPU_TOKENS
    free, _ = torch.cuda.mem_get_info(device)
    per_token = max(activation_bytes_per_token(c, dtype_bytes) for c in configs)
    return max(CPU_TOKENS, min(GPU_MAX_TOKENS, int(free * MEMORY_SHARE) // per_token))
