"""Models as the learner and the scorers run them: loading Hugging Face causal LMs, per-token
log-probs of responses (`modeling`, `chunked_logprobs`; on CUDA `fused_logprobs` with
`entropy_kernel`), sequence packing (`packing`), the attention kernels registered with transformers
(`varlen_attention`, `sequence_parallel`: Ulysses across ranks, its rows' slicing in
`sequence_rows`), training FLOPs (`flops`), Liger's GPU kernels where installed (`liger`), regional
torch.compile of decoder layers (`compiled`), LoRA
adapters (`lora`), the scalar-head models (`scalar_head`: the reward model, and the base of the
critic's value model), int8 weights (`quantization`: the W8A8 scheme of the rollout engines and of
frozen scoring models; `int8_kernels`: which int8 kernel a CPU runs and the activation dtype it
needs, vLLM's answer where it is installed), and the tiny random model and tokenizer the demo
builds on first use (`tiny_model`).

May import: torch, transformers, peft, safetensors, triton and cut-cross-entropy (where the fused head
runs), vLLM only to ask which int8 kernel it would run (where it is installed), `rlhf_cluster.config`,
`data`, `run`, `fileio`; never ray.
"""
