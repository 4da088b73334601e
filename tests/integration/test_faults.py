"""Stateless workers come back: mid-run, one generation worker's process is killed; then the other
is stopped with SIGSTOP (hung: found only by the heartbeat) while the reward worker is killed and
the reference worker hung. Every one is replaced (generation catches up on the weights), serves,
and the job completes with every sample trained once. (Workers joining and leaving a
broadcast group, `transport: collective`, are tested by test_scaling.)"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request

import ray

from actors.job import Job


def test_killed_and_hung_workers_of_every_pool_are_replaced_and_no_sample_is_duplicated(ray_cluster, job_config):
    steps = 100_000  # the test stops the job once the replacements have served, however slow the machine
    cfg = job_config(reference=True,
        name="faults",
        # The store keeps every 3rd version, so a replacement catches up in two moves.
        weights={"transport": "direct", "persist_every": 3},
        generation={"replicas": 2, "prompts_per_request": 1, "sampling": {"n": 4, "max_new_tokens": 8}},
        train={"total_steps": steps, "prompts_per_step": 2, "max_staleness": 1, "progress": False},
        faults={"max_worker_restarts": 2, "restart_backoff_s": 0.1, "heartbeat_interval_s": 1.0,
                "heartbeat_timeout_s": 5.0},
    )
    job = Job(cfg)
    pids = {name: ray.get(actor.info.remote())["pid"] for pool in ("generation", "reward", "reference")
            for name, actor in job.workers(pool).items()}
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
                # Then three at once: a hung generation worker (alive, answering nothing: only the
                # heartbeat can tell), a killed reward worker and a hung reference worker.
                os.kill(pids["gen0"], signal.SIGSTOP)
                os.kill(pids["reward0"], signal.SIGKILL)
                os.kill(pids["ref0"], signal.SIGSTOP)
                faults.append("gen0, ref0 stopped, reward0 killed")
                served_by("gen3")
                rows = len(job.rows)
                deadline = time.monotonic() + 240
                while (len(job.rows) < rows + 2 or job.restarts("reference") < 1) and time.monotonic() < deadline:
                    time.sleep(0.1)
        finally:
            job.stop()

    threading.Thread(target=faults_mid_run, daemon=True).start()
    try:
        result = job.run()
        assert faults == ["gen1 killed", "gen0, ref0 stopped, reward0 killed"]
        # The job completed with both workers replaced and the restarts counted in metrics.
        done = len(result.rows)
        assert result.final_version == done
        assert (job.restarts("generation"), job.restarts("reward"), job.restarts("reference")) == (2, 1, 1)
        assert set(job.workers("generation")) == {"gen2", "gen3"}
        assert set(job.workers("reward")) == {"reward1"} and set(job.workers("reference")) == {"ref1"}
        assert result.rows[-1]["worker_restarts"] == 4
        body = urllib.request.urlopen(f"http://127.0.0.1:{job.metrics_port}/metrics", timeout=10).read().decode()
        for dead in ("gen0", "gen1"):
            assert f'rlhf_pool_worker_restarts_total{{job="{cfg.name}",pool="generation",worker="{dead}"}} 1.0' in body
        # The hung ones were found by their heartbeats (detection and replacement timed); the
        # killed ones by their calls failing.
        for pool, hung in (("generation", "gen0"), ("reference", "ref0")):
            assert f'rlhf_fault_detection_seconds_count{{job="faults",pool="{pool}",worker="{hung}"}} 1.0' in body
            assert f'rlhf_worker_replacement_seconds_count{{job="faults",pool="{pool}",worker="{hung}"}} 1.0' in body
        for pool, killed in (("generation", "gen1"), ("reward", "reward0")):
            assert f'rlhf_pool_worker_restarts_total{{job="faults",pool="{pool}",worker="{killed}"}} 1.0' in body
            assert f'rlhf_fault_detection_seconds_count{{job="faults",pool="{pool}",worker="{killed}"}}' not in body
        # Exactly once: no sample trained on twice, none refused as a duplicate, all steps full.
        ids = [c.sample_id for c in result.consumed]
        assert len(ids) == len(set(ids)) == done * cfg.samples_per_step
        assert job.dropped["duplicate"] == 0
        # The replacements loaded current weights and served, catching up from the newest
        # persisted version by deliveries, each proven.
        for new in ("gen2", "gen3"):
            assert any(c.worker == new for c in result.consumed)
            receipts = [r for r in job.delivery_receipts if r.worker == new]
            assert receipts and all(r.status in ("loaded", "held") for r in receipts), receipts
    finally:
        job.shutdown()
