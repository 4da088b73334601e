"""The GPU checks: the learner, the scoring pool's reference forward and the weight path's host hop
at real model shapes, on a lent GPU machine with no package index (`make gpu-check`,
scripts/gpu_check.sh: `python -m benchmarks.gpu.check` runs the others as steps, each a
subprocess with its own time limit). Without CUDA each runs at tiny shapes on the CPU.

- `check.py`: the steps, one JSON report and one table (`tests/integration/test_gpu_check.py`);
- `learner.py`: our learner step against a plain PyTorch loop, and the log-prob path's memory;
- `paths.py`: the reference forward and the host hop;
- `step_profile.py`: where one learner step's kernel time goes (`torch.profiler`);
- `models.py`, `sides.py`, `logprob_memory.py`: what those share (random models of published
  shapes and their batches; ours and the plain loop; the log-prob path's memory, one process each).

Each needs only torch and transformers besides the library: no Ray, no vLLM (the GPU machine has neither).
"""
