"""What a job tells its operator: metrics, traces, per-step reports, plots and liveness.

- `metrics`: metric names (`rlhf_<component>_<what>_<unit>`) and the Prometheus collectors.
- `tracing`: wall-clock spans from every process and the Chrome/Perfetto trace.
- `step_report`: one learner step's row; `rollout_stats`: the rollout statistics that warn of
  reward hacking.
- `plotting`: a run's curves; `liveness`: a stuck worker told from a busy one (heartbeats).
- `op_counts`: the aten operations (kernel launches, casts) a region of code dispatches.

May import: `rlhf_cluster.experience`, `run`; never ray.
"""
