"""Grow and shrink the generation pool of a running job through its JobController."""

from __future__ import annotations

from actors.job import Job
from tests.integration.scaling_operator import run_while_scaling


def test_scale_generation_up_and_down_while_running(ray_cluster, job_config, driver_assigned_on_its_loop):
    # Far more steps than needed: the test stops the job once both resizes are done, however slow
    # the machine is.
    steps = 100_000
    cfg = job_config(
        name="scaling",
        # A broadcast group of the learner's rank 0 and the engines: the added worker and the
        # retired one change the group of the next push (the filesystem transport: test_pipeline).
        weights={"transport": {"type": "collective", "bucket_mb": 0.05, "timeout_s": 30}},
        generation={"replicas": 1, "prompts_per_request": 1, "sampling": {"n": 4, "max_new_tokens": 8}},
        train={"total_steps": steps, "prompts_per_step": 2, "max_staleness": 1, "progress": False},
    )
    job = Job(cfg)
    result, seen = run_while_scaling(job, "scaling", "generation")
    receipts = job.delivery_receipts
    assert driver_assigned_on_its_loop == [], "the operator's thread (scale, stop) assigned the driver's state"
    assert seen["up"]["changed"] == ["gen1"] and seen["up"]["sizes"]["generation"] == 2
    assert seen["down"]["changed"] == ["gen1"] and seen["down"]["sizes"]["generation"] == 1
    assert seen["targets_up"] == {"gen0", "gen1"} and seen["targets_down"] == {"gen0"}

    # The new worker served samples, all made with weights at least as new as the version
    # published when it joined (it loaded them before serving).
    from_new = [c for c in result.consumed if c.worker == "gen1"]
    assert from_new, "the added worker never served a consumed sample"
    assert min(c.policy_version for c in from_new) >= seen["up"]["version"]

    # Every version an engine loaded is the learner's (fingerprints), gen1's since it joined;
    # each was broadcast to a group of the engines of its push.
    loaded = [r for r in receipts if r.loaded]
    assert not [r for r in receipts if r.status == "refused"], receipts
    assert all(r.proven for r in loaded)
    assert {"gen0", "gen1"} <= {r.worker for r in loaded}
    assert {r.version for r in loaded if r.worker == "gen0"} == set(range(result.final_version + 1))

    # No sample lost or used twice, and the staleness bound held throughout.
    done = len(result.rows)
    ids = [c.sample_id for c in result.consumed]
    assert len(ids) == len(set(ids)) == done * cfg.samples_per_step
    assert job.dropped["duplicate"] == 0
    assert all(0 <= c.step - c.policy_version <= cfg.train.max_staleness for c in result.consumed)
    assert result.final_version == done
