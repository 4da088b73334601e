"""Stateless workers come back: mid-run, one generation worker's process is killed, then the other
is stopped with SIGSTOP (hung: found only by the heartbeat); both are replaced, catch up on the
weights, serve, and the job completes with every sample trained once. (A worker joining under the
filesystem transport is tested by test_scaling.)"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request

import ray

from actors.job import Job


def test_killed_then_hung_generation_workers_are_replaced_and_no_sample_is_duplicated(ray_cluster, job_config):
    steps = 100_000  # the test stops the job once the replacements have served, however slow the machine
    cfg = job_config(
        name="faults",
        # The store keeps every 3rd version, so a replacement catches up in two moves.
        weights={"transport": "direct", "persist_every": 3},
        generation={"replicas": 2, "prompts_per_request": 1, "sampling": {"n": 4, "max_new_tokens": 8}},
        train={"total_steps": steps, "prompts_per_step": 2, "max_staleness": 1, "progress": False},
        faults={"max_worker_restarts": 2, "restart_backoff_s": 0.1, "heartbeat_interval_s": 1.0,
                "heartbeat_timeout_s": 5.0},
    )
    job = Job(cfg)
    pids = {name: ray.get(actor.info.remote())["pid"] for name, actor in job.workers("generation").items()}
    faults: list[str] = []

    def served_by(worker: str) -> bool:
        deadline = time.monotonic() + 240
        while not any(c.worker == worker for c in list(job.consumed)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return time.monotonic() < deadline

    def faults_mid_run() -> None:
        try:
            while len(job.rows) < 3:
                time.sleep(0.05)
            os.kill(pids["gen1"], signal.SIGKILL)  # the worker's process, not a polite ray.kill
            faults.append("gen1 killed")
            if served_by("gen2"):
                os.kill(pids["gen0"], signal.SIGSTOP)  # alive, answering nothing: only the heartbeat can tell
                faults.append("gen0 stopped")
                served_by("gen3")
        finally:
            job.stop()

    threading.Thread(target=faults_mid_run, daemon=True).start()
    try:
        result = job.run()
        assert faults == ["gen1 killed", "gen0 stopped"]
        # The job completed with both workers replaced and the restarts counted in metrics.
        done = len(result.rows)
        assert result.final_version == done
        assert job.restarts("generation") == 2
        assert set(job.workers("generation")) == {"gen2", "gen3"}
        assert result.rows[-1]["worker_restarts"] == 2
        body = urllib.request.urlopen(f"http://127.0.0.1:{job.metrics_port}/metrics", timeout=10).read().decode()
        for dead in ("gen0", "gen1"):
            assert f'rlhf_pool_worker_restarts_total{{job="{cfg.name}",pool="generation",worker="{dead}"}} 1.0' in body
        # The hung one was found by its heartbeat (detection and replacement timed); the killed one by its calls.
        assert f'rlhf_fault_detection_seconds_count{{job="{cfg.name}",pool="generation",worker="gen0"}} 1.0' in body
        assert f'rlhf_worker_replacement_seconds_count{{job="{cfg.name}",pool="generation",worker="gen0"}} 1.0' in body
        assert 'rlhf_fault_detection_seconds_count{job="faults",pool="generation",worker="gen1"}' not in body
        # Exactly once: no sample trained on twice, none refused as a duplicate, all steps full.
        ids = [c.sample_id for c in result.consumed]
        assert len(ids) == len(set(ids)) == done * cfg.samples_per_step
        assert job.dropped["duplicate"] == 0
        # The replacements loaded current weights and served, catching up from the newest
        # persisted version by deliveries, each proven.
        for new in ("gen2", "gen3"):
            assert any(c.worker == new for c in result.consumed)
            receipts = [r for r in job.delivery_receipts if r["worker"] == new]
            assert receipts and all(r.get("loaded") is not None and "refused" not in r for r in receipts), receipts
    finally:
        job.shutdown()
