"""`rlhf-cluster scale --pool scoring` resizes the reward pool and whichever of the reference and
the teacher pool the job runs (`actors/workers/control.py`); `teacher` is a pool of its own."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from actors.workers import control


class FakeController:
    """The JobController's answers, at once (`ray.get` is the identity here)."""

    def __init__(self, sizes: dict[str, int]):
        self.sizes, self.requested = sizes, []
        self.get_sizes = SimpleNamespace(remote=lambda: dict(self.sizes))
        self.request_scale = SimpleNamespace(remote=self._request)
        self.outcome = SimpleNamespace(remote=lambda ticket: {"changed": [], "sizes": self.sizes})

    def _request(self, pool: str, replicas: int) -> int:
        self.requested.append((pool, replicas))
        return len(self.requested)


@pytest.mark.parametrize("runs", ["reference", "teacher"])
def test_scoring_resizes_the_reward_pool_and_the_log_prob_pool_the_job_runs(monkeypatch, runs):
    controller = FakeController({"generation": 1, "reward": 1, runs: 1})
    monkeypatch.setattr(control.ray, "get_actor", lambda name, namespace: controller)
    monkeypatch.setattr(control.ray, "get", lambda value: value)
    assert list(control.scale("job", "scoring", 3)) == ["reward", runs]
    assert controller.requested == [("reward", 3), (runs, 3)]
    assert "teacher" in control.POOLS


def test_scoring_before_the_pools_are_reported_is_an_error_not_a_silent_no_op(monkeypatch):
    controller = FakeController({})
    monkeypatch.setattr(control.ray, "get_actor", lambda name, namespace: controller)
    monkeypatch.setattr(control.ray, "get", lambda value: value)
    with pytest.raises(RuntimeError, match="no scoring pool is running"):
        control.scale("job", "scoring", 3)
    assert controller.requested == []
