"""The soak's fault schedule (benchmarks/soak/plan.py, issue 58) comes from its seed alone, so a run
that broke an invariant can be replayed fault for fault; every round holds every kind once."""

from __future__ import annotations

from benchmarks.soak import plan as soak
from benchmarks.soak.report import LEARNED_MARGIN, START_SAMPLED, by_kind, held_out_by_step, learned


def test_the_seed_decides_the_schedule_and_every_round_holds_every_kind():
    kinds = list(soak.FAULTS)
    first, again, other = (soak.plan(seed, 60, 40, kinds) for seed in (0, 0, 1))
    assert first == again and first != other
    assert len(first) == 40 and len({p.kind for p in first}) == len(kinds) == 15
    for start in range(0, 30, len(kinds)):  # whole rounds: each kind once
        assert sorted(p.kind for p in first[start : start + len(kinds)]) == sorted(kinds)
    # Gaps average the run's length over the faults (+1), so they fit in it.
    assert 0.8 * 60 * 60 < sum(p.gap_s for p in first) < 1.2 * 60 * 60


def test_every_fault_kind_names_the_recoveries_that_detect_it():
    recoveries = {
        "worker_replaced",
        "worker_hung",
        "learner_rebuilt",
        "resumed",
        "scaled",
        "reward_failed",
        "disk_full",
    }
    for kind, (pool, detected_by) in soak.FAULTS.items():
        assert detected_by and set(detected_by) <= recoveries, kind
        assert pool in (None, "generation", "reward", "reference"), kind


def test_the_report_counts_each_kind_s_undetected_and_unrecovered_faults():
    injected = [
        {"kind": "kill_reward", "detected_s": 2.0, "recovered_s": 3.0},
        {"kind": "kill_reward", "detected_s": 4.0, "recovered_s": None},
        {"kind": "kill_reward", "detected_s": 9.0, "recovered_s": 10.0},
        {"kind": "disk_full", "detected_s": None, "recovered_s": None},
    ]
    table = by_kind(injected)
    assert list(table) == ["disk_full", "kill_reward"]
    assert table["kill_reward"] == {
        "count": 3,
        "undetected": 0,
        "unrecovered": 1,
        "detected_s_median": 4.0,
        "detected_s_max": 9.0,
        "recovered_s_median": 6.5,
        "recovered_s_max": 10.0,
    }
    assert table["disk_full"]["undetected"] == 1 and table["disk_full"]["recovered_s_max"] is None


def test_the_final_accuracy_is_held_to_the_job_s_start_plus_the_learning_margin():
    assert learned(0.381)  # the hour of 2026-11-27 (seed 0), under the demo's 240-step floor of 0.389
    assert not learned(START_SAMPLED + LEARNED_MARGIN - 0.01)  # where a placebo or damaged weights land
    assert not learned(None)  # the final evaluation did not run


def test_the_report_lists_the_periodic_held_out_evaluations_by_step():
    rows = [
        {"step": 999, "reward_mean": 1.8, "eval_sampled_accuracy": 0.30, "eval_accuracy": 0.3},
        {"step": 1000, "reward_mean": 1.9},
        {"step": 1999, "eval_sampled_accuracy": 0.20, "eval_accuracy": 0.2},
        {"step": 999, "eval_sampled_accuracy": 0.35, "eval_accuracy": 0.4},  # a resume trained step 999 again
    ]
    assert held_out_by_step(rows) == [
        {"step": 999, "sampled": 0.35, "greedy": 0.4},
        {"step": 1999, "sampled": 0.20, "greedy": 0.2},
    ]
    assert held_out_by_step([{"step": 5, "reward_mean": 1.0}]) == []


def test_the_soak_s_job_names_its_reward_function_by_an_importable_path(tmp_path):
    """The job's processes import the soak's reward function by its `module:function` string."""
    import importlib

    import yaml

    from benchmarks.soak.job import job_config
    from benchmarks.soak.reward import arithmetic
    from rlhf_cluster.config import load_config

    path = job_config(tmp_path, tmp_path / "run")
    [reward] = yaml.safe_load(path.read_text())["scoring"]["rewards"]
    module, name = reward["function"].split(":")
    assert getattr(importlib.import_module(module), name) is arithmetic
    assert load_config(path).learner.lr == 3.0e-5  # a job config the CLI accepts


def test_the_soak_prints_its_schedule_when_run_as_a_module():
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--plan-only", "--faults", "3", "--seed", "1"],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("{'gap_s': ") for line in lines)
