"""Run a job on a three-raylet Ray cluster on this machine (a head for the driver and pools, two
one-rank learner nodes) and remove one learner node once the job has a checkpoint and three
steps: the raylet and every process on it end, as when a machine is lost.

Run as its own process by tests/integration/test_elastic.py (the test's own Ray session stays
untouched): `python lose_a_learner_node.py CONFIG.yaml`. The job's output goes to stdout; the
exit code is the job's (0: finished).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from actors.job import Job
from rlhf_cluster.config import load_config


def main(config: str) -> int:
    cfg = load_config(config)
    run_dir = Path(cfg.run_dir)
    cluster = Cluster()
    try:
        cluster.add_node(num_cpus=4, resources={"rlhf_pools": 100}, include_dashboard=False)
        learner_nodes = [cluster.add_node(num_cpus=1, resources={"rlhf_learner": 1}) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        with Job(cfg) as job:
            outcome: list = []
            runner = threading.Thread(target=lambda: outcome.append(job.run()), daemon=True)
            runner.start()
            deadline = time.monotonic() + 300
            while not (list((run_dir / "checkpoints").glob("step-*")) and len(job.rows) >= 3):
                if not runner.is_alive() or time.monotonic() > deadline:
                    print("the job ended or stalled before a checkpoint and three steps", flush=True)
                    return 1
                time.sleep(0.1)
            print(f"removing a learner node after step {len(job.rows) - 1}", flush=True)
            cluster.remove_node(learner_nodes[1])
            runner.join(timeout=300)
            return 0 if outcome and outcome[0].final_version == cfg.train.total_steps else 1
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
