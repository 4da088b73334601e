"""A job before and around its run: inputs made ready, checks, placement, warm-up, and the
decisions taken on the run's own measurements.

- `inputs`: the model folder and prompt files made ready before any actor starts.
- `preflight`, `validation`: every check of a config and of the files it names, before anything
  starts (with the rules of `agents`, `teacher`, `judge`, `routing_replay` and `images`);
  `preview`: what `--dry-run` shows; `placement`: what each pool asks of the cluster.
- `warmup`: the short supervised warm-up on the task.
- `guardrails`: the best checkpoint kept, rollbacks and early stops; `elastic`: the world size a
  rebuilt learner continues at; `override`: what those change of a running job's settings
  (`JobOverride`), beside its config, which stays as the job started.
- `preemption`: SIGTERM/SIGINT end a job after its step, with a checkpoint.

May import: `rlhf_cluster.config`, `data`, `models`, `learner`, `generation`, `scoring`, `run`;
never ray.
"""
