"""The soak's fault schedule (benchmarks/_soak_plan.py, issue 58) comes from its seed alone, so a run
that broke an invariant can be replayed fault for fault; every round holds every kind once."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "_soak_plan.py"


def _soak():
    spec = importlib.util.spec_from_file_location("_soak_plan", SOAK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["_soak_plan"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_seed_decides_the_schedule_and_every_round_holds_every_kind():
    soak = _soak()
    kinds = list(soak.FAULTS)
    first, again, other = (soak.plan(seed, 60, 40, kinds) for seed in (0, 0, 1))
    assert first == again and first != other
    assert len(first) == 40 and len({p.kind for p in first}) == len(kinds) == 15
    for start in range(0, 30, len(kinds)):  # whole rounds: each kind once
        assert sorted(p.kind for p in first[start:start + len(kinds)]) == sorted(kinds)
    # Gaps average the run's length over the faults (+1), so they fit in it.
    assert 0.8 * 60 * 60 < sum(p.gap_s for p in first) < 1.2 * 60 * 60


def test_every_fault_kind_names_the_recoveries_that_detect_it():
    soak = _soak()
    recoveries = {"worker_replaced", "worker_hung", "learner_rebuilt", "resumed", "scaled", "reward_failed",
                  "disk_full"}
    for kind, (pool, detected_by) in soak.FAULTS.items():
        assert detected_by and set(detected_by) <= recoveries, kind
        assert pool in (None, "generation", "reward", "reference"), kind


def test_the_report_counts_each_kind_s_undetected_and_unrecovered_faults(monkeypatch):
    monkeypatch.syspath_prepend(str(SOAK.parent))  # _soak_report imports its siblings, as soak.py runs it
    from _soak_report import by_kind

    injected = [
        {"kind": "kill_reward", "detected_s": 2.0, "recovered_s": 3.0},
        {"kind": "kill_reward", "detected_s": 4.0, "recovered_s": None},
        {"kind": "kill_reward", "detected_s": 9.0, "recovered_s": 10.0},
        {"kind": "disk_full", "detected_s": None, "recovered_s": None},
    ]
    table = by_kind(injected)
    assert list(table) == ["disk_full", "kill_reward"]
    assert table["kill_reward"] == {
        "count": 3, "undetected": 0, "unrecovered": 1,
        "detected_s_median": 4.0, "detected_s_max": 9.0, "recovered_s_median": 6.5, "recovered_s_max": 10.0,
    }
    assert table["disk_full"]["undetected"] == 1 and table["disk_full"]["recovered_s_max"] is None


def test_the_final_accuracy_is_held_to_the_job_s_start_plus_the_learning_margin(monkeypatch):
    monkeypatch.syspath_prepend(str(SOAK.parent))
    from _soak_report import LEARNED_MARGIN, START_SAMPLED, learned

    assert learned(0.381)  # the hour of 2026-11-27 (seed 0), under the demo's 240-step floor of 0.389
    assert not learned(START_SAMPLED + LEARNED_MARGIN - 0.01)  # where a placebo or damaged weights land
    assert not learned(None)  # the final evaluation did not run


def test_the_report_lists_the_periodic_held_out_evaluations_by_step(monkeypatch):
    monkeypatch.syspath_prepend(str(SOAK.parent))
    from _soak_report import held_out_by_step

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
