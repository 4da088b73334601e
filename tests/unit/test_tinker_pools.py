"""`actors.workers.tinker.start_pools`: the sampling engines are created before the learner ranks
set up (so both starts run side by side), and whatever was started is killed when either fails.
Ray's calls are replaced by recorders: this is the order and cleanup logic alone (the real start
runs in tests/integration/test_tinker_sdk.py)."""

from __future__ import annotations

import pytest

from actors.workers import tinker as tk
from rlhf_cluster.config.tinker import TinkerConfig


class _Remote:
    def __init__(self, log: list, what: str):
        self.log, self.what = log, what

    def remote(self, *args):
        self.log.append(self.what)
        return self.what


class _Engine:
    def __init__(self, log: list, i: int):
        self.ready = _Remote(log, f"ready {i}")


def _recorded(monkeypatch, group_fails: bool = False, ready_fails: bool = False) -> list:
    log: list = []
    engines = iter(range(10))

    class Options:
        def remote(self, *args):
            i = next(engines)
            log.append(f"engine {i} created")
            return _Engine(log, i)

    class Group:
        def __init__(self, *args, **kwargs):
            log.append("ranks set up")
            if group_fails:
                raise RuntimeError("no rank placed")

        def kill(self):
            log.append("ranks killed")

    def get(refs, timeout=None):
        if ready_fails:
            raise RuntimeError("an engine died")
        return refs

    monkeypatch.setattr(tk.TinkerEngine, "options", lambda **kw: Options())
    monkeypatch.setattr(tk, "RankGroup", Group)
    monkeypatch.setattr(tk.ray, "get", get)
    monkeypatch.setattr(tk.ray, "kill", lambda actor, no_restart: log.append("engine killed"))
    return log


def _cfg(engines: int) -> TinkerConfig:
    return TinkerConfig.model_validate({"sampling": {"engines": engines}})


def test_engines_are_created_before_the_ranks_set_up(monkeypatch):
    log = _recorded(monkeypatch)
    group, engines = tk.start_pools(_cfg(2), "/model")
    assert len(engines) == 2
    assert log == ["engine 0 created", "engine 1 created", "ranks set up", "ready 0", "ready 1"]


@pytest.mark.parametrize("fails", ["group", "ready"])
def test_a_failed_start_kills_what_was_started(monkeypatch, fails):
    log = _recorded(monkeypatch, group_fails=fails == "group", ready_fails=fails == "ready")
    with pytest.raises(RuntimeError):
        tk.start_pools(_cfg(2), "/model")
    killed = [x for x in log if x.endswith("killed")]
    assert killed == (["engine killed"] * 2 if fails == "group" else ["ranks killed", "engine killed", "engine killed"])
