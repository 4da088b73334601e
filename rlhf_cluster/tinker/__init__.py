"""A training API in the shape of Thinking Machines' Tinker, served by this project's pools.

Researchers who write their own loops against Tinker's SDK (`forward_backward`, `optim_step`,
`save_weights_for_sampler`, `sample`, on LoRA adapters) point it at `rlhf-cluster tinker CONFIG`
and run them on their own models. This folder holds the Ray-free parts: the wire format the SDK
speaks (`wire` what it reads, `replies` what it writes, `proto`), the built-in losses (`losses`),
one learner rank's bank of client adapters (`bank`), futures and sessions (`futures`,
`sessions`), the routes' logic (`service`) and the HTTP app (`server`). `actors/workers/tinker.py`
backs the service with learner ranks and generation workers. It never imports ray or the `tinker`
SDK; it may import `algorithms`, `models`, `generation`, `gateway`, `experience`, `config`,
`telemetry` and the modules at the package root.
"""
