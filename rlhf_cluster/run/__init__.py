"""The run directory and everything a job writes in it, read back by resume, replay and the CLI.

- `run_dir`: the run's files by name (every component reads and writes the run through it).
- `lock`: one job per run directory.
- `checkpoint`: a checkpoint per step (temp name, renamed when complete; digests, refusal).
- `job_state`: the job's own state a checkpoint captures beside the ranks' (prompt order,
  admission, buffer, KL controller).
- `scored_log`, `sample_log`: every scored group as it arrives; a readable sample of each step.
- `status`, `replay`: a run directory read back for `rlhf-cluster status` and `replay`.

Its files are written with `rlhf_cluster.fileio`'s durable primitives.

May import: `rlhf_cluster.config`, `data`, `experience`, `job`, `scoring`, `telemetry`; never ray.
"""
