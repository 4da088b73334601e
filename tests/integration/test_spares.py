"""A warm spare (`generation.spares: 1`) stands in for a generation worker whose process is killed
mid-run: it was loaded with every version as the pool was (it joined every push), it serves from
the next request on without starting an engine, and a new spare starts behind it, loads the
newest weights and waits out of rotation. Every sample is trained once."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import ray
from prometheus_client import REGISTRY

from actors.job import Job
from rlhf_cluster.fileio import read_jsonl
from rlhf_cluster.run.status import describe_run


def test_a_killed_generation_worker_is_replaced_by_the_warm_spare(ray_cluster, job_config):
    cfg = job_config(
        name="spares",
        weights={"transport": "direct"},
        generation={"replicas": 1, "spares": 1, "prompts_per_request": 1, "sampling": {"n": 4, "max_new_tokens": 8}},
        train={"total_steps": 100_000, "prompts_per_step": 2, "max_staleness": 1, "progress": False},
        # A generous heartbeat timeout: on a loaded machine a slow answer must not replace a worker too.
        faults={"max_worker_restarts": 1, "restart_backoff_s": 60.0, "heartbeat_interval_s": 1.0,
                "heartbeat_timeout_s": 30.0},
    )  # fmt: skip
    job = Job(cfg)
    assert set(job.workers("generation")) == {"gen0"} and set(job.spares("generation")) == {"gen1"}
    pid = ray.get(job.workers("generation")["gen0"].info.remote())["pid"]
    seen: dict[str, object] = {}

    def kill_mid_run() -> None:
        try:
            # Pushes are acknowledged in the background, a receipt may land after the next step's row:
            # wait (bounded) for three steps and the receipts of three versions at both workers.
            settle = time.monotonic() + 120
            while True:
                receipts = list(job.delivery_receipts)
                versions = [sorted({r.version for r in receipts if r.worker == w}) for w in ("gen0", "gen1")]
                settled = len(versions[0]) >= 3 and versions[1] == versions[0]
                if (len(job.rows) >= 3 and settled) or time.monotonic() > settle:
                    break
                time.sleep(0.05)
            seen["versions"] = versions
            seen["kill_at"] = len(job.rows)
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 240
            # The spare serves, and the spare started behind it has joined (loaded the newest weights).
            while time.monotonic() < deadline and not (
                any(c.worker == "gen1" for c in list(job.consumed)) and "gen2" in job.spares("generation")
            ):
                time.sleep(0.1)
            seen["after"] = len(job.rows)
            rows = len(job.rows)
            while len(job.rows) < rows + 2 and time.monotonic() < deadline:
                time.sleep(0.1)  # the new spare takes pushes like the pool
        finally:
            job.stop()

    threading.Thread(target=kill_mid_run, daemon=True).start()
    try:
        result = job.run()
        # The spare had every version pushed before the kill, as the worker in rotation did.
        in_rotation, spare = seen["versions"]
        assert spare == in_rotation and len(spare) >= 3, seen
        events = read_jsonl(Path(cfg.run_dir) / "events.jsonl").rows
        replaced = [e for e in events if e["event"] == "worker_replaced" and e["pool"] == "generation"]
        assert [(e["worker"], e["replacement"], e["spare"]) for e in replaced] == [("gen0", "gen1", True)]
        assert set(job.workers("generation")) == {"gen1"} and set(job.spares("generation")) == {"gen2"}
        assert job.restarts("generation") == 1
        receipts = [r for r in job.delivery_receipts if r.worker == "gen2"]
        assert receipts and all(r.status in ("loaded", "held") for r in receipts), receipts
        assert max(r.version for r in receipts) >= seen["after"] - 1
        ids = [c.sample_id for c in result.consumed]
        assert len(ids) == len(set(ids)) == len(result.rows) * cfg.samples_per_step
        assert any(c.worker == "gen1" for c in result.consumed)
        assert "  generation: 1 worker + 1 spare, fixed" in describe_run(Path(cfg.run_dir))
        labels = {"job": "spares", "pool": "generation", "worker": "driver"}
        assert REGISTRY.get_sample_value("rlhf_pool_spares", labels) == 1.0  # the spare made behind, ready
    finally:
        job.shutdown()
