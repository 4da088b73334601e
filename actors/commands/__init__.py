"""What the CLI's commands run beside `train`: submitting and retrying jobs, steering a running
one, stopping on a signal, and reading or replaying a run.

- `submission`: what `submit` ships to a cluster; `supervisor`: `--max-retries`.
- `control`: the named actor through which a running job is scaled from outside.
- `preemption`: SIGTERM/SIGINT end a job after its step, with a checkpoint.
- `run_views`: `plot`, `samples`, `trace`, `status` of a run directory; `replay`: a recorded run's
  steps trained again.
- `supervised`: the supervised stages (`sft`, `train-rm`).
"""
