"""The Ray actors that do the work and the groups that hold them.

- `generation`: a vLLM engine that loads the weight versions pushed to it.
- `scoring`: rule-based and reward-model rewards; the frozen reference model.
- `learner`, `critic`: the policy's and the value model's FSDP2/DeepSpeed ranks.
- `pools`: same-kind actors with least-busy dispatch that grow and shrink while serving.
- `rank_group`: every torch.distributed group of actors (learner, critic, supervised stages).
- `control`: the job's controller actor (resize a pool, stop the job) and the CLI's side of it.
- `_common`: what every actor does at start (its config, its metrics endpoint).

Each actor wraps `rlhf_cluster` objects thinly: the maths and the state live in the library.
"""
