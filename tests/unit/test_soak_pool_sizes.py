"""The soak's pools over time (benchmarks/soak/pools.py, issue 73): the table from events.jsonl's
starts, resizes, autoscaler decisions and replacements, the resizes per pool, and the rule that no
pool is resized more than 4 times in any 10 minutes; and the soak's job with the autoscaler and a
warm spare on."""

from __future__ import annotations

from benchmarks.soak.pools import (
    OSCILLATION_RESIZES,
    OSCILLATION_WINDOW_S,
    current_sizes,
    format_table,
    most_in_window,
    oscillating,
    pool_report,
    timeline,
)

BEGAN = 1000.0


def _events() -> list[dict]:
    """A soak's rows: a start, the autoscaler shrinking reward, a manual grow of generation and its
    release, a worker replaced by its spare and one by a new worker, a failed resize, a resume."""
    start = {"event": "pools_started", "sizes": {"generation": 2, "reward": 2}, "auto": ["generation", "reward"]}
    replaced = {"event": "worker_replaced"}
    return [
        {"time": 990.0, **start},
        {"time": 1060.0, "event": "scaled", "pool": "reward", "replicas": 1, "changed": ["reward1"], "source": "auto"},
        {"time": 1060.5, **replaced, "pool": "reward", "worker": "reward0", "replacement": "reward9", "spare": False},
        {"time": 1061.0, "event": "autoscaled", "pool": "reward", "from": 2, "to": 1, "reason": "reward was idle"},
        {"time": 1100.0, "event": "scaled", "pool": "generation", "replicas": 3, "source": "manual"},
        {"time": 1101.0, "event": "scale_released", "pool": "generation"},
        {"time": 1200.0, **replaced, "pool": "generation", "worker": "gen0", "replacement": "gen3", "spare": True},
        {"time": 1210.0, **replaced, "pool": "reward", "worker": "reward0", "replacement": "reward2", "spare": False},
        {"time": 1250.0, "event": "autoscale_failed", "pool": "reward", "to": 2, "error": "RuntimeError('no room')"},
        {"time": 1300.0, "event": "resumed", "step": 40},
        {"time": 1310.0, **start},
    ]  # fmt: skip


def test_the_table_follows_every_start_resize_release_and_replacement():
    rows = timeline(_events(), BEGAN)
    assert [(r.t_s, r.pool, r.size, r.source) for r in rows] == [
        (-10.0, "generation", 2, "start"),
        (-10.0, "reward", 2, "start"),
        (60.0, "reward", 1, "auto"),
        (60.5, "reward", 1, "replaced"),
        (100.0, "generation", 3, "manual"),
        (101.0, "generation", 3, "released"),
        (200.0, "generation", 3, "replaced"),
        (210.0, "reward", 1, "replaced"),
        (250.0, "reward", 1, "auto_failed"),
        (310.0, "generation", 2, "resume"),
        (310.0, "reward", 2, "resume"),
    ]
    assert rows[2].detail == "reward was idle"  # the autoscaled row's reason, on its resize (a replacement between)
    assert rows[4].detail == ""  # a manual resize has none
    assert rows[6].detail == "gen0 -> gen3 (a warm spare)" and rows[7].detail == "reward0 -> reward2 (a new worker)"
    assert "no room" in rows[8].detail


def test_a_replacement_row_without_the_spare_field_says_neither():
    [_, row] = timeline(
        [
            {"time": 0.0, "event": "pools_started", "sizes": {"generation": 2}, "auto": []},
            {"time": 5.0, "event": "worker_replaced", "pool": "generation", "worker": "gen1", "replacement": "gen2"},
        ],
        0.0,
    )
    assert row.detail == "gen1 -> gen2" and row.size == 2


def test_the_summary_counts_resizes_by_source_replacements_by_spare_and_time_at_each_size():
    pools = pool_report(_events(), BEGAN, BEGAN + 400.0)
    gen, reward = pools["by_pool"]["generation"], pools["by_pool"]["reward"]
    assert gen["resizes"] == 1 and gen["resizes_by_source"] == {"manual": 1, "auto": 0}
    assert reward["resizes_by_source"] == {"manual": 0, "auto": 1} and reward["failed_resizes"] == 1
    assert (gen["replaced"], gen["replaced_by_spare"]) == (1, 1)
    assert (reward["replaced"], reward["replaced_by_spare"]) == (2, 0)
    assert (gen["min_size"], gen["max_size"], gen["last_size"]) == (2, 3, 2)
    # The schedule's 400 s: generation at 2 until the grow at 100 s and again after the resume at 310 s.
    assert gen["seconds_at_size"] == {"2": 190.0, "3": 210.0}
    assert reward["seconds_at_size"] == {"1": 250.0, "2": 150.0}
    assert pools["oscillation_rule"] == {"resizes": 4, "window_s": 600.0} and not oscillating(pools)
    assert len(pools["timeline"]) == 11 and pools["timeline"][0]["source"] == "start"


def test_a_pool_resized_more_than_4_times_in_10_minutes_oscillates():
    assert (OSCILLATION_RESIZES, OSCILLATION_WINDOW_S) == (4, 600.0)
    assert most_in_window([], 600.0) == 0
    assert most_in_window([0.0, 100.0, 200.0, 300.0, 700.0, 800.0], 600.0) == 4  # [100, 700] holds 100..700
    assert most_in_window([0.0, 600.0, 1200.0], 600.0) == 2  # the window's ends count
    start = {"time": 0.0, "event": "pools_started", "sizes": {"reward": 2}, "auto": ["reward"]}

    def resized(times: list[float]) -> list[dict]:
        return [start] + [
            {"time": t, "event": "scaled", "pool": "reward", "replicas": 1 + i % 2, "source": "auto"}
            for i, t in enumerate(times)
        ]

    # Up and down every 90 s (the cooldown, never its reversal's three): five in 6 minutes.
    assert oscillating(pool_report(resized([100, 190, 280, 370, 460]), 0.0, 900.0)) == ["reward"]
    # Every reversal three cooldowns after the last (the autoscaler's rule at 90 s): three in 10 minutes.
    assert oscillating(pool_report(resized([100, 370, 640, 910]), 0.0, 1200.0)) == []
    # Starts and replacements are not resizes.
    restarts = [{**start, "time": float(t)} for t in range(10, 300, 30)]
    assert oscillating(pool_report(restarts, 0.0, 300.0)) == []


def test_the_current_sizes_are_the_newest_start_s_and_every_resize_after_it():
    events = _events()
    assert current_sizes(events) == {"generation": 2, "reward": 2}
    assert current_sizes(events[:6]) == {"generation": 3, "reward": 1}
    assert current_sizes([]) == {}


def test_the_printout_lists_every_row_and_each_pool_s_summary():
    lines = format_table(pool_report(_events(), BEGAN, BEGAN + 400.0))
    assert len(lines) == 1 + 11 + 1 + 2
    assert "generation" in lines[5] and "manual" in lines[5]
    assert lines[-2].startswith("  generation: 1 resizes (1 manual, 0 auto") and "(1 by a spare)" in lines[-2]


def test_the_soak_s_job_runs_the_autoscaler_and_a_warm_spare_within_room_it_has(tmp_path):
    from benchmarks.soak.job import AUTOSCALE, GENERATION_REPLICAS, REWARD_REPLICAS, gen_slots, job_config
    from rlhf_cluster.config import load_config

    cfg = load_config(job_config(tmp_path, tmp_path / "run"))
    assert cfg.generation.spares == 1
    for pool, start in (("generation", GENERATION_REPLICAS), ("reward", REWARD_REPLICAS)):
        bounds = cfg.scaling.auto.of(pool)
        assert bounds.enabled and bounds.min_replicas <= start <= bounds.max_replicas, pool
        # The densest the autoscaler can change a pool between bounds two apart: two changes a cooldown apart,
        # then the reversal's three cooldowns, and so on (1 -> 2 -> 3 -> 2 -> 1 ...). It stays within the rule.
        assert bounds.max_replicas - bounds.min_replicas <= 2, pool
        c = bounds.cooldown_s
        densest = [t for k in range(10) for t in (k * 4 * c, k * 4 * c + c)]
        assert most_in_window(densest, OSCILLATION_WINDOW_S) <= OSCILLATION_RESIZES, pool
    assert not cfg.scaling.auto.reference.enabled and not cfg.scaling.auto.judge.enabled
    # The generation raylet has a slot for generation at its largest, each spare, and one spare being remade.
    assert gen_slots(1) == AUTOSCALE["generation"]["max_replicas"] + 2
    off = load_config(job_config(tmp_path, tmp_path / "run", autoscale=False, spares=0))
    assert not off.scaling.auto.active and off.generation.spares == 0


def test_the_soak_hits_only_processes_its_own_raylets_started():
    import os
    import subprocess
    import sys

    import psutil

    from benchmarks.soak.driver import started_by

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        process = psutil.Process(child.pid)
        assert started_by(process, {os.getpid()})  # this test started it
        assert not started_by(process, {child.pid + 100_000})  # another cluster's raylet did not
    finally:
        child.kill()
        child.wait()
    assert not started_by(process, {os.getpid()})  # gone: never a target
