"""The autoscaler's rule (`rlhf_cluster/job/autoscale.py`): grow the bottleneck while the learner
waits, shrink a pool idle for N steps, one worker and one pool a round, within the bounds, the
cooldown, the window and a manual pin; and it does not oscillate on a signal that flips."""

from __future__ import annotations

from rlhf_cluster.config import AutoScaling
from rlhf_cluster.job.autoscale import Autoscaler, Decision, fits, resource_bundles

ON = {"enabled": True, "min_replicas": 1, "max_replicas": 3, "window": 3, "cooldown_s": 0, "shrink_after_steps": 4}


def scaler(**pools) -> Autoscaler:
    return Autoscaler(AutoScaling(**{pool: {**ON, **over} for pool, over in pools.items()}))


def row(wait=0.0, stale=0.0, **busy) -> dict[str, float]:
    return {"learner_wait_seconds": wait, "dropped_stale": stale, **{f"busy_{p}": b for p, b in busy.items()}}


def feed(a: Autoscaler, rows, sizes, t0=0.0, dt=1.0) -> list[tuple[int, Decision]]:
    """Each row at one step (`dt` seconds apart), the decisions applied to `sizes`."""
    made = []
    for i, r in enumerate(rows):
        for d in a.observe(r, sizes, t0 + i * dt):
            assert d.current == sizes[d.pool]
            sizes[d.pool] = d.replicas
            made.append((i, d))
    return made


def test_grows_the_busiest_pool_while_the_learner_waits_after_a_full_window():
    a = scaler(generation={}, reward={})
    sizes = {"generation": 1, "reward": 1}
    hot = row(wait=2.0, generation=0.85, reward=0.95)
    made = feed(a, [hot] * 3, sizes)
    assert [(i, d.pool, d.current, d.replicas, d.direction) for i, d in made] == [(2, "reward", 1, 2, "up")]
    assert "learner waited 2.00 s" in made[0][1].reason and "reward was busy 0.95" in made[0][1].reason


def test_when_generation_is_the_bottleneck_generation_grows_instead():
    a = scaler(generation={}, reward={})
    sizes = {"generation": 1, "reward": 1}
    made = feed(a, [row(wait=2.0, generation=0.97, reward=0.4)] * 3, sizes)
    assert [(d.pool, d.replicas) for _, d in made] == [("generation", 2)]


def test_a_busy_pool_does_not_grow_while_the_learner_does_not_wait():
    a = scaler(reward={})
    assert feed(a, [row(wait=0.1, reward=1.0)] * 10, {"reward": 1}) == []


def test_at_most_one_pool_a_round_and_the_window_restarts_after_a_change():
    a = scaler(generation={}, reward={})
    sizes = {"generation": 1, "reward": 1}
    made = feed(a, [row(wait=2.0, generation=0.9, reward=0.95)] * 6, sizes)
    # Step 2 grows reward (the busiest); steps 3-5 refill the window; step 5 grows reward again.
    assert [(i, d.pool) for i, d in made] == [(2, "reward"), (5, "reward")]
    assert sizes == {"generation": 1, "reward": 3}


def test_never_above_max_nor_below_min():
    a = scaler(reward={"max_replicas": 2, "min_replicas": 2})
    sizes = {"reward": 2}
    assert feed(a, [row(wait=5.0, reward=1.0)] * 10 + [row(reward=0.0)] * 10, sizes) == []
    b = scaler(reward={"max_replicas": 3})
    sizes = {"reward": 1}
    feed(b, [row(wait=5.0, reward=1.0)] * 30, sizes)
    assert sizes["reward"] == 3


def test_shrinks_a_pool_idle_for_shrink_after_steps_in_a_row():
    a = scaler(reward={"shrink_after_steps": 4})
    sizes = {"reward": 3}
    rows = [row(reward=0.1)] * 3 + [row(reward=0.5)] + [row(reward=0.1)] * 4
    made = feed(a, rows, sizes)
    # The busy step (3) breaks the run: the shrink comes after four quiet steps in a row (4-7).
    assert [(i, d.replicas, d.direction) for i, d in made] == [(7, 2, "down")]
    assert "for 4 steps in a row" in made[0][1].reason


def test_cooldown_holds_a_pool_that_just_changed():
    a = scaler(reward={"cooldown_s": 10})
    sizes = {"reward": 1}
    made = feed(a, [row(wait=2.0, reward=1.0)] * 20, sizes, dt=1.0)
    assert [i for i, _ in made] == [2, 12]  # 10 s after the first change, with a full window since


def test_a_pinned_pool_is_left_alone_until_released():
    a = scaler(reward={})
    sizes = {"reward": 1}
    a.pin("reward")
    assert feed(a, [row(wait=2.0, reward=1.0)] * 10, sizes) == []
    a.release("reward")
    made = feed(a, [row(wait=2.0, reward=1.0)] * 3, sizes)
    assert [(i, d.replicas) for i, d in made] == [(2, 2)]  # a full window measured after the release


def test_a_disabled_or_absent_pool_is_never_changed():
    a = scaler(reward={})  # generation off
    sizes = {"generation": 1, "reward": 3}
    made = feed(a, [row(wait=2.0, generation=1.0, reward=0.0)] * 10, sizes)
    assert {d.pool for _, d in made} == {"reward"} and all(d.direction == "down" for _, d in made)


def test_a_grow_that_does_not_fit_gives_way_to_the_next_candidate():
    a = scaler(generation={}, reward={})
    sizes = {"generation": 1, "reward": 1}
    for i in range(3):
        made = a.observe(row(wait=2.0, generation=0.85, reward=0.95), sizes, i, fits=lambda d: d.pool != "reward")
    assert [(d.pool, d.replicas) for d in made] == [("generation", 2)]


def test_no_oscillation_on_a_signal_that_flips_every_step():
    """0 changes in 60 steps: hot (the learner waits 2 s, reward busy 1.0) and idle (0.0) steps in
    turn average to a busy share of 0.33-0.67 over any window, and no idle run is long enough."""
    a = scaler(reward={})
    sizes = {"reward": 2}
    rows = [row(wait=2.0, reward=1.0) if i % 2 else row(wait=0.0, reward=0.0) for i in range(60)]
    assert feed(a, rows, sizes) == []


def test_a_signal_in_bursts_is_followed_at_most_once_a_burst():
    """Bursts of 4 hot steps and 5 idle ones, 10 s a step, cooldown 60 s: 3 changes in 40 steps
    (400 s): up, up, then down once; none within 60 s of the last, and no reversal within 180 s."""
    a = scaler(reward={"cooldown_s": 60, "max_replicas": 4})
    sizes = {"reward": 2}
    rows = [row(wait=2.0, reward=1.0) if i % 9 < 4 else row(wait=0.0, reward=0.0) for i in range(40)]
    made = feed(a, rows, sizes, dt=10.0)
    assert [(i, d.direction) for i, d in made] == [(2, "up"), (11, "up"), (34, "down")]
    for (i, d), (j, e) in zip(made, made[1:]):
        assert (j - i) * 10.0 >= (60 if d.direction == e.direction else 180)


def test_generation_does_not_grow_while_samples_go_stale_and_shrinks_on_them_when_asked():
    a = scaler(generation={})
    sizes = {"generation": 2}
    hot_and_stale = [row(wait=2.0, stale=8.0 * i, generation=1.0) for i in range(10)]
    assert feed(a, hot_and_stale, sizes) == []
    b = scaler(generation={"shrink_stale_samples": 4})
    sizes = {"generation": 2}
    made = feed(b, [row(wait=0.0, stale=8.0 * i, generation=0.9) for i in range(4)], sizes)
    # The first row only sets the cumulative count (0 dropped); with two steps of 8 drops the
    # window's mean is 5.3 a step.
    assert [(i, d.direction) for i, d in made] == [(2, "down")] and "stale" in made[0][1].reason


def test_the_teacher_pool_takes_the_reference_settings():
    a = scaler(reference={})
    sizes = {"teacher": 1}
    assert [d.pool for _, d in feed(a, [row(wait=2.0, teacher=1.0)] * 3, sizes)] == ["teacher"]


def test_fits_and_bundles():
    up, down = Decision("reward", 1, 3, ""), Decision("reward", 2, 1, "")
    assert fits(up, {"CPU": 4.0, "GPU": 1.0}, {"CPU": 2.0})
    assert not fits(up, {"CPU": 3.0}, {"CPU": 2.0})
    assert not fits(up, {"CPU": 8.0}, {"CPU": 1.0, "GPU": 1.0})  # no GPU free
    assert fits(down, {}, {"GPU": 1.0})
    assert fits(up, {}, {})  # workers that ask nothing always fit
    bundles = resource_bundles({"generation": 2, "reward": 1}, {"generation": {"GPU": 1.0}, "reward": {}})
    assert bundles == [{"GPU": 1.0}, {"GPU": 1.0}]


def test_rows_without_the_columns_read_as_zero():
    a = scaler(reward={"shrink_after_steps": 2})
    assert a.observe({}, {"reward": 2}, 0.0) == []
    assert [d.replicas for d in a.observe({}, {"reward": 2}, 1.0)] == [1]  # busy 0 for two steps: idle
