"""The policy learner: FSDP2 ranks and the RL objective."""
