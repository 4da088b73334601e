"""The Ray actors that do the work and the groups that hold them.

- `generation`: a vLLM engine that loads the weight versions pushed to it.
- `scoring`: rule-based and reward-model rewards; the frozen reference model; distillation's teacher.
- `judge`: a judge model's verdicts as a reward, on its own vLLM engine.
- `learner`, `critic`: the policy's and the value model's FSDP2/DeepSpeed ranks.
- `pools`: same-kind actors with least-busy dispatch that grow and shrink while serving.
- `pool_table`: the job's pools, one row each (a new pool is one row); `scoring_calls`: the calls a
  rollout makes to the scoring pools, joined while they are busy.
- `rank_group`: every torch.distributed group of actors (learner, critic, supervised stages).
- `control`: the job's controller actor (resize a pool, stop the job) and the CLI's side of it;
  `autoscaling`: the driver's side of the autoscaler (its rows in, its resizes out, placement).
- `_common`: what every actor does at start (its config, its metrics endpoint), and `Worker`, the
  base of every worker (name, labels, `info`, heartbeat, stall clock).

Each actor wraps `rlhf_cluster` objects thinly: the maths and the state live in the library.
"""
