"""What the CLI's commands run beside `train`: submitting and retrying jobs, and reading or
replaying a run. (Steering a running job: `actors/workers/control.py`; stopping on a signal:
`rlhf_cluster/job/preemption.py`.)

- `submission`: what `submit` ships to a cluster; `supervisor`: `--max-retries`.
- `run_views`: `plot`, `samples`, `trace`, `status` of a run directory; `replay`: a recorded run's
  steps trained again.
- `supervised`: the supervised stages (`sft`, `train-rm`).
"""
