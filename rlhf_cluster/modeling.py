"""Model loading and per-token log-probs of responses, shared by the learner and the reference.

Sequences are prompt+response, right-padded. The log-prob of response token t comes from the
logits at position `prompt_len - 1 + t`; the output is in the response frame [B, T].
"""

from __future__ import annotations

from pathlib import Path

import torch


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A Hugging Face causal LM from a local folder; flash-attn on CUDA when installed, SDPA otherwise.

    `device="spread"`: over every visible GPU, its layers split between them (accelerate's
    `device_map="auto"`): a frozen scoring model larger than one GPU (the reference design's 70B
    reference on 4 GPUs); one GPU or none is the same as "cuda" / "cpu"."""
    from transformers import AutoModelForCausalLM

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model path {folder}: expected a Hugging Face folder with config.json")
    attn = "sdpa"
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            attn = "flash_attention_2"
        except ImportError:
            pass
    if device == "spread":
        if torch.cuda.device_count() > 1:
            return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn, device_map="auto")
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn)
    return model.to(device)


def response_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_lengths: torch.Tensor,
    response_len: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [B, T] of the response tokens (and their entropies if asked) under `model`.

    Positions past a response's end hold garbage and must be masked by the caller.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    B, L = input_ids.shape
    steps = torch.arange(response_len, device=input_ids.device)
    # Position p predicts token p+1; clamp keeps padded positions in range (they are masked later).
    pos = (prompt_lengths.to(input_ids.device)[:, None] - 1 + steps[None, :]).clamp(max=L - 2)
    targets = input_ids.gather(1, pos + 1)
    picked = logits.gather(1, pos[:, :, None].expand(B, response_len, logits.shape[-1])).float()
    if temperature != 1.0:
        picked = picked / temperature
    logp_all = picked.log_softmax(-1)
    logprobs = logp_all.gather(-1, targets[:, :, None]).squeeze(-1)
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, entropy


def sequence_logprobs(model, prompt_ids: list[int], response_ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """Log-probs [T] of one response under `model` (no grad): the reference an engine's
    per-token log-probs are checked against."""
    seq = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logp, _ = response_logprobs(model, seq, torch.ones_like(seq), torch.tensor([len(prompt_ids)]), len(response_ids),
                                    temperature)
    return logp[0]
