"""The invariants a soak run checks after its faults (`rlhf_cluster.run.invariants`), on run
directories written here: each holds on a clean run and names what broke it on a broken one."""

from __future__ import annotations

from rlhf_cluster.experience.records import ScoredSample
from rlhf_cluster.run.invariants import Fault, check_run, detections
from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.run.scored_log import BUFFERED, ScoredLog


def _run(tmp_path, steps, consumed, staleness=(0,), times=None, groups=("g0", "g1"), proven=True) -> RunDir:
    run = RunDir(tmp_path / "run", tmp_path / "weights", tmp_path / "ckpt")
    run.root.mkdir(parents=True)
    times = times or [100.0 + 2 * i for i in range(len(steps))]
    run.append(RunDir.METRICS, [{"step": s, "staleness_max": staleness[i % len(staleness)], "time": t}
                                for i, (s, t) in enumerate(zip(steps, times))])
    run.append(RunDir.CONSUMED, [{"step": 0, "sample_id": sid, "worker": "gen0", "policy_version": 1,
                                  "policy_versions": [[0, 0], [1, 1]]} for sid in consumed])
    run.append(RunDir.RECEIPTS, [{"worker": "gen0", "version": 1, "status": "loaded", "proven": proven},
                                 {"worker": "gen1", "version": 2, "status": "loaded", "proven": True}])
    log = ScoredLog(run / RunDir.SCORED_LOG)
    (run / RunDir.SCORED_LOG).mkdir()
    for g in groups:
        log.append([ScoredSample(sample_id=f"{g}:0", prompt_id="p", group_id=g, prompt_ids=[1], response_ids=[2],
                                 rollout_logprobs=[-1.0], policy_version=0, finish_reason="stop", reward=1.0,
                                 reward_components={}, ref_logprobs=[-1.0], advantages=[0.0])], BUFFERED)
    log.flush()
    return run


def test_a_clean_run_holds_every_invariant(tmp_path):
    report = check_run(_run(tmp_path, [0, 1, 2], ["a", "b", "c"]), max_staleness=1, max_gap_s=10)
    assert report.hold, report.broken()
    assert report["steps_contiguous"].value == 3 and report["longest_gap_s"].value == 2.0


def test_each_broken_invariant_is_named(tmp_path):
    run = _run(tmp_path, [0, 1, 1, 3], ["a", "b", "a"], staleness=(0, 3), times=[0.0, 1.0, 200.0, 201.0],
               groups=("g0", "g1", "g0"))
    report = check_run(run, max_staleness=1, max_gap_s=120)
    assert {i.name for i in report.broken()} == {"trained_once", "groups_once", "steps_contiguous", "staleness",
                                                 "longest_gap_s"}
    assert "'a'" in report["trained_once"].detail and "'g0'" in report["groups_once"].detail
    assert "(1, 3)" in report["staleness"].detail and report["longest_gap_s"].value == 199.0


def test_a_version_served_without_a_proven_receipt_is_named(tmp_path):
    """gen0 generated with version 1, and its receipt for it does not prove the bytes it loaded
    (version 0, the job's starting model, needs none)."""
    report = check_run(_run(tmp_path, [0, 1], ["a"], proven=False), max_staleness=1)
    assert [i.name for i in report.broken()] == ["served_proven"]
    assert "('gen0', 1)" in report["served_proven"].detail
    run = _run(tmp_path / "reused", [0, 1], ["a"])  # a resume reused a group: its worker is unknown ("?")
    run.append(RunDir.CONSUMED, [{"step": 1, "sample_id": "b", "worker": "recovered", "policy_version": 2,
                                  "policy_versions": [[0, 2]]},
                                 {"step": 1, "sample_id": "c", "worker": "?", "policy_version": 3,
                                  "policy_versions": [[0, 3]]}])
    report = check_run(run, max_staleness=5)
    assert "('?', 3)" in report["served_proven"].detail and "2)" not in report["served_proven"].detail


def test_each_fault_is_matched_to_its_own_detection_within_the_bound():
    events = [
        {"event": "worker_replaced", "pool": "reward", "time": 11.0},
        {"event": "worker_replaced", "pool": "generation", "time": 12.0},
        {"event": "resumed", "time": 50.0},
        {"event": "worker_replaced", "pool": "generation", "time": 400.0},
    ]
    faults = [
        Fault(10.0, "kill_generation", ("worker_replaced",), "generation"),
        Fault(13.0, "kill_generation", ("worker_replaced",), "generation"),  # the 12 s one is taken; 400 s is too late
        Fault(40.0, "driver_sigterm", ("resumed",)),
        Fault(60.0, "driver_sigterm", ("resumed",)),  # a resume before the fault is not its detection
    ]
    found = detections(faults, events, bound_s=120)
    assert [d.seconds for d in found] == [2.0, None, 10.0, None]
