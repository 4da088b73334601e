"""The pure parts of `benchmarks.autoscaling`: the reward's slowdown switch (a control file every
worker reads), the halfway watch, steps per minute after the switch and the ratio, the resize
counts, and the oscillation bound N in M against the controller's own rule."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from benchmarks import _autoscaling_reward as reward
from benchmarks import autoscaling as bench
from rlhf_cluster.config import AutoScaling
from rlhf_cluster.job.autoscale import Autoscaler


def test_the_switch_reaches_every_reader_of_the_control_file(tmp_path: Path, monkeypatch):
    control = tmp_path / "delay"
    monkeypatch.setattr(reward, "REREAD_S", 0.0)
    monkeypatch.delenv(reward.ENV, raising=False)
    assert reward.delay() == 0.0  # no variable: no sleep
    monkeypatch.setenv(reward.ENV, str(control))
    assert reward.delay() == 0.0  # no file yet
    reward.set_delay(control, 0.002)
    assert reward.delay() == 0.002
    reward.set_delay(control, 0.002 * bench.SLOWDOWN)
    assert reward.delay() == pytest.approx(0.008) and not control.with_suffix(".part").exists()
    control.write_text("not a number")
    assert reward.delay() == 0.0
    monkeypatch.setattr(reward, "REREAD_S", 60.0)  # read again only after a minute: the last read holds
    reward.set_delay(control, 0.5)
    assert reward.delay() == 0.0 and reward.read_delay() == 0.5


def test_the_reward_sleeps_what_the_file_says_then_verifies(tmp_path: Path, monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(reward, "REREAD_S", 0.0)
    monkeypatch.setattr(reward.time, "sleep", slept.append)
    monkeypatch.setenv(reward.ENV, str(tmp_path / "delay"))
    reward.set_delay(tmp_path / "delay", 0.004)
    right, wrong = reward.arithmetic("7", "7"), reward.arithmetic("8", "7")
    assert slept == [0.004, 0.004]
    assert right["correct"] == 1.0 and wrong["correct"] == 0.0
    reward.set_delay(tmp_path / "delay", 0.0)
    reward.arithmetic("7", "7")
    assert slept == [0.004, 0.004]  # no sleep at 0


def test_the_watch_switches_once_at_the_halfway_row_and_not_after_the_job(tmp_path: Path):
    metrics, calls, done = tmp_path / "metrics.jsonl", [], threading.Event()
    metrics.write_text("{}\n" * 3)
    bench.watch_halfway(metrics, 3, lambda: calls.append(1), done)
    assert calls == [1]
    done.set()
    bench.watch_halfway(tmp_path / "absent.jsonl", 3, lambda: calls.append(2), done)
    assert calls == [1]


def test_steps_per_minute_after_the_switch_and_the_ratio():
    rows = [{"time": t} for t in (0.0, 1.0, 2.0, 10.0, 12.0, 14.0, 16.0)]
    # After t=10: 3 rows (12, 14, 16) over the 6 s since the switch.
    assert bench.steps_per_minute(rows, 10.0) == pytest.approx(30.0)
    assert bench.steps_per_minute(rows, 0.0, 2.0) == pytest.approx(60.0)  # rows at 1 and 2, 2 s
    assert bench.steps_per_minute(rows, 15.0) is None  # one row only
    assert bench.ratio(45.0, 30.0) == 1.5
    assert bench.ratio(None, 30.0) is None and bench.ratio(45.0, 0.0) is None


def scaled(pool: str, t: float, to: int, frm: int) -> list[dict]:
    return [
        {"event": "autoscaled", "pool": pool, "time": t, "from": frm, "to": to, "reason": "r"},
        {"event": "scaled", "pool": pool, "time": t, "replicas": to, "changed": [], "source": "auto"},
    ]


def test_sizes_resizes_reversals_and_the_bound():
    events = [{"event": "pools_started", "time": 0.0, "sizes": {"generation": 1, "reward": 1}}]
    events += scaled("reward", 10.0, 2, 1) + scaled("reward", 30.0, 3, 2) + scaled("reward", 80.0, 2, 3)
    start, end = bench.pool_sizes(events)
    assert start == {"generation": 1, "reward": 1} and end == {"generation": 1, "reward": 2}
    assert bench.resize_times(events) == {"reward": [10.0, 30.0, 80.0]}
    assert bench.reversals(events, "reward") == 1 and bench.reversals(events, "generation") == 0
    assert bench.most_within([0.0, 10.0, 59.0, 61.0], 60.0) == 3 and bench.most_within([], 60.0) == 0
    assert bench.oscillation(events) == {
        "pools": {"reward": {"resizes": 3, "most_in_window": 2, "reversals": 1}},
        "ok": True,
    }
    flapping = events + scaled("reward", 85.0, 3, 2)
    assert not bench.oscillation(flapping)["ok"]


def test_the_controller_with_the_benchmarks_settings_stays_within_n_in_m():
    """N and M follow from the rule: fed a load that comes and goes every minute for 15 minutes
    (a row a second), the reward pool (1..3, cooldown 15 s) changes both ways, never more than
    N = 2 times in any M = 60 s."""
    assert (bench.N_RESIZES, bench.M_SECONDS) == (2, 60.0)
    a = Autoscaler(AutoScaling(**bench.auto_block({"reward": 3})))
    sizes, times, moves = {"reward": 1}, [], []
    for t in range(900):
        hot = (t // 60) % 2 == 0
        row = {"learner_wait_seconds": 2.0 if hot else 0.0, "busy_reward": 1.0 if hot else 0.0}
        for d in a.observe(row, sizes, float(t)):
            sizes["reward"] = d.replicas
            times.append(float(t))
            moves.append(d.direction)
    assert "up" in moves and "down" in moves and len(times) >= 6
    assert bench.most_within(times, bench.M_SECONDS) <= bench.N_RESIZES
