"""Stateless workers come back: a generation worker's process is killed (filesystem transport)
or stopped with SIGSTOP, hung, and found by the heartbeat (direct transport) mid-run, and the job
completes with every sample trained once."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request

import pytest
import ray

from actors.job import Job


@pytest.mark.parametrize("transport", ["filesystem", "direct"])
def test_killed_generation_worker_is_replaced_and_no_sample_is_duplicated(ray_cluster, job_config, transport):
    steps = 100_000  # the test stops the job once the replacement has served, however slow the machine
    cfg = job_config(
        name=f"faults-{transport}",  # the driver's counters live in this process: one job name per run
        # direct: the store keeps every 3rd version, so the replacement catches up in two moves.
        weights={"transport": transport, "persist_every": 3},
        generation={"replicas": 2, "prompts_per_request": 1, "sampling": {"n": 4, "max_new_tokens": 8}},
        train={"total_steps": steps, "prompts_per_step": 2, "max_staleness": 1, "progress": False},
        faults={"max_worker_restarts": 2, "restart_backoff_s": 0.1, "heartbeat_interval_s": 1.0,
                "heartbeat_timeout_s": 5.0},
    )
    fault = signal.SIGKILL if transport == "filesystem" else signal.SIGSTOP  # SIGSTOP: alive, answering nothing
    job = Job(cfg)
    victim = job.workers("generation")["gen1"]
    pid = ray.get(victim.info.remote())["pid"]
    killed = threading.Event()

    def kill_mid_run() -> None:
        try:
            while len(job.rows) < 3:
                time.sleep(0.05)
            os.kill(pid, fault)  # the worker's process, not a polite ray.kill
            killed.set()
            deadline = time.monotonic() + 240
            while not any(c.worker == "gen2" for c in list(job.consumed)) and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            job.stop()

    threading.Thread(target=kill_mid_run, daemon=True).start()
    try:
        result = job.run()
        assert killed.is_set()
        # The job completed with the worker replaced and the restart counted in metrics.
        done = len(result.rows)
        assert result.final_version == done
        assert job.restarts("generation") == 1
        assert set(job.workers("generation")) == {"gen0", "gen2"}
        assert result.rows[-1]["worker_restarts"] == 1
        body = urllib.request.urlopen(f"http://127.0.0.1:{job.metrics_port}/metrics", timeout=10).read().decode()
        assert f'rlhf_pool_worker_restarts_total{{job="{cfg.name}",pool="generation",worker="gen1"}} 1.0' in body
        hung = f'{{job="{cfg.name}",pool="generation",worker="gen1"}}'
        if fault == signal.SIGSTOP:  # found by the heartbeat, not by a call failing: detection and replacement timed
            assert f"rlhf_fault_detection_seconds_count{hung} 1.0" in body
            assert f"rlhf_worker_replacement_seconds_count{hung} 1.0" in body
        else:
            assert f"rlhf_fault_detection_seconds_count{hung}" not in body
        # Exactly once: no sample trained on twice, none refused as a duplicate, all steps full.
        ids = [c.sample_id for c in result.consumed]
        assert len(ids) == len(set(ids)) == done * cfg.samples_per_step
        assert job.dropped["duplicate"] == 0
        # The replacement loaded current weights and served.
        assert any(c.worker == "gen2" for c in result.consumed)
        if transport == "direct":
            # It caught up from the newest persisted version by deliveries, each proven.
            receipts = [r for r in job.delivery_receipts if r["worker"] == "gen2"]
            assert receipts and all(r.get("loaded") is not None and "refused" not in r for r in receipts), receipts
            assert {r["fingerprint"] for r in receipts} <= {r["fingerprint"] for r in job.delivery_receipts if r["worker"] == "gen0"}
    finally:
        job.shutdown()
