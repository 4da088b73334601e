"""A Ray cluster of two raylets on this machine, for benchmarks whose jobs span nodes: the head
(the driver's node) and a second raylet with custom resources of its own, so a job puts a pool
there by `resources.custom` and a grow is held to what that raylet has left.

Not a benchmark itself (scripts/run_benchmarks.sh skips modules whose names start with `_`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping

from benchmarks.common import REPO


def importable_env() -> None:
    """Put the repository on $PYTHONPATH: the job's processes (started by the raylets, with this
    process's environment as it is when they start) import `benchmarks.*` functions by name."""
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


@contextlib.contextmanager
def two_raylets(
    second: Mapping[str, float], head_cpus: int = 8, second_cpus: int = 4, verbose: bool = False
) -> Iterator[object]:
    """The two raylets (`ray.cluster_utils.Cluster`), this process connected as the driver, its own
    temp dir, no dashboard; yields the cluster. `second`: the second raylet's custom resources.
    Set what the job's processes must inherit ($PYTHONPATH: `importable_env`) before entering.
    Everything is shut down and removed afterwards."""
    import ray
    from ray.cluster_utils import Cluster

    ray_tmp = tempfile.mkdtemp(prefix="rlhf-ray-", dir="/tmp")
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": head_cpus, "include_dashboard": False, "temp_dir": ray_tmp}
    )
    try:
        cluster.add_node(num_cpus=second_cpus, resources=dict(second))
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=verbose)
        try:
            yield cluster
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
