"""An hour of chaos (issue 58): the demo's job, with more pools than the demo and a tenth of its
learning rate (so that it learns over most of the hour, not only its first minutes), on a Ray cluster of
two raylets on this machine, for `--minutes` of wall time while a seeded schedule of faults hits
it; then the run directory and the Prometheus scrapes are checked (rlhf_cluster/run/invariants.py).

    .venv/bin/python -m benchmarks.soak --minutes 60 --seed 0        (make soak)

The job (`job.py`): 2 generation workers and a warm spare (on the second raylet, which the soak kills
and restarts), 2 reward workers, a reference worker, 2 learner ranks, the collective weight transport,
the run directory on a size-limited tmpfs (where the machine lets root mount one), the reward function
of `reward.py` (the verifier, failing or hanging while the soak says so); the autoscaler sizes its
generation (2..3) and reward (1..3) pools (`--no-autoscale --spares 0`: the job as before issue 73).
The schedule (`plan.py`, from the seed alone) is rounds of every fault kind in a seeded order, at
seeded gaps; a fault is injected (`run.py`) at its planned time or once the one before has
recovered, whichever is later, so each fault's detection and recovery are timed on their own. A
fault's detection is its recovery's row in events.jsonl (`FAULTS` names which); its recovery, the
first step trained after that.

At the end the driver is stopped and resumed for a few last steps with the held-out evaluation,
whose sampled accuracy is held to the job's start plus a learning margin (`report.learned`);
the job also evaluates every 1,000 steps, and the report lists those evaluations by step.
The report (`report.py`; printed, and JSON under benchmarks/results/soak/) gives faults by
kind, detection and recovery times, steps per minute with and without a fault being recovered
from, every invariant, and the pools' sizes over time (`pools.py`: every start, resize, release
and replacement, whether a spare stood in, and the check that no pool was resized more than 4
times in any 10 minutes).

Importing this package imports nothing heavy: the job's processes import `benchmarks.soak.reward`
by its `module:function` name.
"""
