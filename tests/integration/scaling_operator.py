"""An operator who resizes a pool of a running job, as `rlhf-cluster scale` does: the job runs
while a thread scales `pool` to 2 workers after its second step, back to 1 `steps_up` steps
later, and stops the job `steps_down` steps after that."""

from __future__ import annotations

import json
import threading
import time

from actors.job import Job
from actors.workers.control import scale


def run_while_scaling(job: Job, name: str, pool: str, steps_up: int = 4, steps_down: int = 3):
    """Run `job` (named `name`) under the operator; returns (the job's result, what the operator saw: each resize's
    outcome `up` / `down`, the pool's workers in the scrape targets after it `targets_up` /
    `targets_down`, and the step count then `step_up` / `step_down`). An operator failure fails it."""
    seen: dict = {}
    errors: list[BaseException] = []

    def workers_in_targets() -> set[str]:
        groups = json.loads((job.run_dir / "prometheus_targets.json").read_text())
        return {g["labels"]["worker"] for g in groups if g["labels"]["pool"] == pool}

    def after(steps: int) -> None:
        while len(job.rows) < steps:
            time.sleep(0.05)

    def operator() -> None:
        try:
            after(2)
            for side, replicas, wait in (("up", 2, steps_up), ("down", 1, steps_down)):
                seen[side] = scale(name, pool, replicas)[pool]
                seen[f"targets_{side}"] = workers_in_targets()
                seen[f"step_{side}"] = len(job.rows)
                after(seen[f"step_{side}"] + wait)
        except BaseException as exc:  # surfaced below; a failing thread must fail the test
            errors.append(exc)
        finally:
            job.stop()

    thread = threading.Thread(target=operator, daemon=True)
    thread.start()
    try:
        result = job.run()
    finally:
        job.shutdown()
    thread.join(timeout=5)
    assert not errors, errors
    return result, seen
