"""`LearnerSlot.starting`: the learner's ranks are built in a thread while the body starts the
worker pools. Whatever fails, ranks that were built are adopted (so the job's shutdown ends them),
the body has run (so pools it started are the job's to end too), and the build's own error is the
one raised when it failed; with int8 rollouts the learner is adopted before the body runs (the
engines start from its int8 weights). No Ray: the build is replaced."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

import actors.checkpointer
from actors.checkpointer import LearnerSlot
from rlhf_cluster.config import load_config


class _PoolsFailed(Exception):
    pass


class _BuildFailed(Exception):
    pass


def _slot(monkeypatch, *overrides: str, build_fails: bool = False) -> tuple[LearnerSlot, list]:
    built: list = []  # (thread name, the start) of each build

    def build(cfg, override, inputs, checkpointer, run_dir, ckpt, previous):
        if build_fails:
            raise _BuildFailed("no ranks")
        trainer = SimpleNamespace(send=object(), cfg=SimpleNamespace(learner=SimpleNamespace(world_size=1)))
        start = SimpleNamespace(trainer=trainer, state="state", guard="guard", override=override,
                                published_version=4, delivery="delivery")
        built.append((threading.current_thread().name, start))
        return start

    monkeypatch.setattr(actors.checkpointer, "build_learner", build)
    adopted: list = []
    weights = SimpleNamespace(adopt=lambda delivery, send: adopted.append(threading.current_thread()))
    reporter = SimpleNamespace(learner_ranks=lambda n: None, version=lambda v: None)
    slot = LearnerSlot(load_config(None, list(overrides)), None, SimpleNamespace(run_dir=None), reporter, weights, None)
    slot.adopted_on = adopted  # type: ignore[attr-defined]  # the threads adoption ran on
    return slot, built


def test_the_pools_failing_leaves_the_built_learner_adopted(monkeypatch):
    slot, built = _slot(monkeypatch)
    with pytest.raises(_PoolsFailed):
        with slot.starting(None):
            raise _PoolsFailed("an engine did not start")
    [(thread, start)] = built
    assert thread.startswith("learner-start") and slot.trainer is start.trainer and slot.published_version == 4
    assert slot.adopted_on == [threading.current_thread()]  # built in the thread, adopted on the caller's


def test_the_build_failing_raises_its_own_error_after_the_body(monkeypatch):
    slot, _ = _slot(monkeypatch, build_fails=True)
    ran = []
    with pytest.raises(_BuildFailed):
        with slot.starting(None):
            ran.append("pools")
    assert ran == ["pools"] and not hasattr(slot, "trainer")
    with pytest.raises(_BuildFailed):  # both failing: the build's error
        with slot.starting(None):
            raise _PoolsFailed("an engine did not start")


def test_int8_rollouts_adopt_the_learner_before_the_pools_start(monkeypatch):
    slot, built = _slot(monkeypatch, "generation.quantization=int8")
    with slot.starting(None):
        assert slot.published_version == 4 and slot.trainer is built[0][1].trainer  # the engines' int8 weights
    plain, _ = _slot(monkeypatch)
    with plain.starting(None):
        assert not hasattr(plain, "trainer")  # adopted when the body is done
    assert plain.published_version == 4
