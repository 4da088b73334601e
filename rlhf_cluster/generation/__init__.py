"""Rollout generation: the vLLM engine wrapper and what runs in its process.

- `engine`: the vLLM engine driven by its own loop thread (continuous batching, in-flight loads);
  `vllm_process`: the environment vLLM reads; `gc_pause`: its heavy imports with the GC paused.
- `weight_transfer`: the weight-transfer backend through which an engine loads checked tensors.
- `episodes`, `environments`: multi-turn episodes and the environments that answer each turn.
- `quantization`: int8 weights; `probe`: the post-sync probe; `batch_recorder`: engine stats.
"""
