"""Models as the learner and the scorers run them: loading Hugging Face causal LMs, per-token
log-probs of responses (`modeling`, `chunked_logprobs`), sequence packing (`packing`), Liger's GPU
kernels where installed (`liger`), regional torch.compile of decoder layers (`compiled`), and the
tiny random model and tokenizer the demo builds on first use (`tiny_model`).

May import: torch, transformers, `rlhf_cluster.config`, `data`, `run`; never ray.
"""
