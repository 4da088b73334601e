"""The `rlhf-cluster` command line and what its commands run. (Steering a running job:
`actors/workers/control.py`; stopping on a signal: `rlhf_cluster/job/preemption.py`.)

- `cli`: the Typer app (`rlhf-cluster`, `python -m actors.commands.cli`); registers every command
  below, and holds the small `gateway` and `version`. No other module here imports it.
- `common`: what several commands share: the default config, loading it and preflight (a refusal
  exits 2), connecting to Ray, the cluster's capacity, input errors, a job's printed result.
- `training`: `train` (its `--dry-run`, `--overwrite`); `supervisor`: its `--max-retries`.
- `stages`: the supervised-stage commands `sft`, `train-rm`, `pipeline`; `supervised`: their Ray driver.
- `jobs`: the Ray Jobs API commands `submit`, `status`, `logs`, `stop`, `scale`; `submission`: the
  working directory `submit` ships to a cluster.
- `run_views`: `plot`, `samples`, `trace`, `replay`, `status` of a run directory; `replay`: a
  recorded run's steps trained again.
"""
