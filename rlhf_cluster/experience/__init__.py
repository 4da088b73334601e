"""The experience path: from a scored group of rollouts to the samples the learner trains on.

- `records`: the records that flow through the pipeline and their Arrow schema (also on disk).
- `build`: a scored group turned into buffer samples (reward shaping, KL in the reward,
  advantages), and a step's batch finalised.
- `buffer`: scored samples waiting for the learner, in whole groups, exactly once.
- `admission`: how many prompt groups may start now, and which (bounded staleness).

May import: `rlhf_cluster.config`, `algorithms`, `rewards`, `data`, `models`; never ray.
"""
