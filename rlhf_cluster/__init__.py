"""rlhf_cluster: the single-process library of the RLHF system; it never imports ray (`actors/`
wraps it in Ray actors and holds the driver). One folder per part, in the order data flows:

- `data`: prompt sources and built-in tasks; `config`: the typed job configuration.
- `generation`: the vLLM engine, multi-turn episodes and environments; `gateway`: the
  OpenAI-compatible gateway for agent code; `tools`: tools a policy calls.
- `scoring`, `rewards`: frozen reward and reference models, rule-based rewards, shaping.
- `experience`: scored groups into samples, the buffer, admission (staleness).
- `algorithms`: the losses, advantages, KL and importance correction (pure functions).
- `learner`, `models`: FSDP2/DeepSpeed ranks and the model code they share with the scorers.
- `weights`: how a version leaves the learner and reaches every engine.
- `tinker`: the Tinker-compatible training API (`rlhf-cluster tinker`) on the learner and engines.
- `run`: the run directory (checkpoints, logs, lock, job state); `job`: inputs, checks,
  placement, warm-up, guardrails; `telemetry`: metrics, traces, reports, liveness.

Two modules every folder may import sit here: `fileio` (durable writes: temp file, fsync,
rename) and `user_code` (importing what a config names as `module:attribute`).
"""
