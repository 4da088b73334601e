"""Around the autoscaler's rule: `scaling.auto`'s refusals, the driver's side that applies its
decisions (`actors/workers/autoscaling.py`, with a fake resize and fake Ray resources), the
`scale` command's --replicas/--auto, the release through the controller, and the pools' lines of
`rlhf-cluster status`."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from actors.commands.cli import app
from actors.workers import control
from actors.workers.autoscaling import Placement, PoolAutoscaling
from rlhf_cluster.config import ConfigError, JobConfig, PoolAutoscale, load_config
from rlhf_cluster.job.autoscale import Decision
from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.run.status import describe_pools


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"min_replicas": 3, "max_replicas": 2}, "min_replicas (3) must be <= max_replicas (2)"),
        ({"busy_low": 0.8, "busy_high": 0.5}, "busy_low (0.8) must be < busy_high (0.5)"),
        ({"busy_high": 1.5}, "busy_high"),
        ({"window": 0}, "window"),
    ],
)
def test_pool_settings_refused_name_the_field(fields, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PoolAutoscale(**fields)


def test_a_file_with_bad_settings_names_the_dotted_path(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "scaling:\n  auto:\n    reward:\n      enabled: true\n      min_replicas: 4\n      max_replicas: 2\n"
    )
    with pytest.raises(ConfigError, match=r"scaling\.auto\.reward.*min_replicas \(4\) must be <= max_replicas \(2\)"):
        load_config(path)


def test_a_start_size_outside_the_bounds_is_refused_naming_both_fields():
    with pytest.raises(ValidationError, match=r"scoring\.reward_replicas \(5\) lies outside scaling\.auto\.reward"):
        JobConfig(scoring={"reward_replicas": 5}, scaling={"auto": {"reward": {"enabled": True, "max_replicas": 3}}})
    JobConfig(scoring={"reward_replicas": 5})  # off: no bounds apply
    auto = JobConfig().scaling.auto
    assert not auto.active and auto.of("teacher") is auto.reference


def test_placement_holds_a_grow_to_free_resources_or_asks_rays_autoscaler():
    up = Decision("generation", 1, 2, "")
    asked: list[list[dict]] = []
    free = Placement(
        {"generation": {"GPU": 1.0}, "reward": {}}, False, available=lambda: {"GPU": 0.5}, request=asked.append
    )
    assert not free.allows(up) and free.allows(Decision("reward", 1, 2, ""))
    free.reserve({"generation": 2, "reward": 1})
    assert asked == []  # no autoscaler configured: nothing is asked
    nodes = Placement({"generation": {"GPU": 1.0}, "reward": {}}, True, available=lambda: {}, request=asked.append)
    assert nodes.allows(up)
    nodes.reserve({"generation": 2, "reward": 1})
    assert asked == [[{"GPU": 1.0}, {"GPU": 1.0}]]


def _autoscaling(tmp_path, sizes, resize):
    cfg = JobConfig(
        name="t", run_dir=str(tmp_path), scaling={"auto": {"reward": {"enabled": True, "window": 1, "cooldown_s": 0}}}
    )
    run_dir = RunDir(tmp_path, tmp_path / "w", tmp_path / "c")
    placement = Placement({}, False, available=lambda: {})
    return PoolAutoscaling(cfg, run_dir, lambda: dict(sizes), resize, placement), run_dir


def test_decisions_go_through_the_resize_and_become_events(tmp_path):
    sizes = {"generation": 1, "reward": 1}
    calls = []

    async def resize(pool, replicas, source):
        calls.append((pool, replicas, source))
        sizes[pool] = replicas

    scaling, run_dir = _autoscaling(tmp_path, sizes, resize)
    scaling.started()
    hot = {"learner_wait_seconds": 3.0, "busy_reward": 1.0, "busy_generation": 0.2, "step": 0}

    async def two_steps():
        task = asyncio.get_running_loop().create_task(scaling.run())
        scaling.observe(hot)
        scaling.observe(hot)  # seen while the first decision is pending: not observed
        await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(two_steps())
    assert calls == [("reward", 2, "auto")]
    events = run_dir.read(RunDir.EVENTS)
    assert events[0]["event"] == "pools_started" and events[0]["auto"] == ["reward"]
    (auto,) = [e for e in events if e["event"] == "autoscaled"]
    assert (auto["pool"], auto["from"], auto["to"]) == ("reward", 1, 2) and "learner waited" in auto["reason"]


def test_a_pool_pinned_after_the_decision_is_left_alone_and_a_failure_is_an_event(tmp_path):
    sizes = {"reward": 1}

    async def failing(pool, replicas, source):
        raise RuntimeError("no room")

    scaling, run_dir = _autoscaling(tmp_path, sizes, failing)
    scaling.pin("reward")
    asyncio.run(scaling.apply(Decision("reward", 1, 2, "x")))
    assert run_dir.read(RunDir.EVENTS) == []
    scaling.release("reward")
    asyncio.run(scaling.apply(Decision("reward", 1, 2, "x")))
    kinds = [e["event"] for e in run_dir.read(RunDir.EVENTS)]
    assert kinds == ["scale_released", "autoscale_failed"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--replicas", "2", "--auto"], "--replicas and --auto together"),
        ([], "give --replicas N (resize and pin the pool) or --auto"),
    ],
)
def test_scale_takes_replicas_or_auto_exactly_one(args, message):
    result = CliRunner().invoke(app, ["scale", "job", "--pool", "reward", *args])
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith("error: ") and message in result.output
    assert "Traceback" not in result.output


def test_release_goes_to_the_controller_without_a_size(monkeypatch):
    requested = []
    fake = SimpleNamespace(
        request_scale=SimpleNamespace(remote=lambda pool, replicas: requested.append((pool, replicas)) or 1),
        outcome=SimpleNamespace(remote=lambda ticket: {"changed": [], "sizes": {"reward": 2}, "auto": ["reward"]}),
    )
    monkeypatch.setattr(control.ray, "get_actor", lambda name, namespace: fake)
    monkeypatch.setattr(control.ray, "get", lambda value: value)
    assert control.scale("job", "reward", None)["reward"]["auto"] == ["reward"]
    assert requested == [("reward", None)]


def test_status_shows_each_pools_size_mode_and_last_decision():
    events = [
        {
            "event": "pools_started",
            "sizes": {"generation": 1, "reward": 1, "reference": 1},
            "auto": ["generation", "reward"],
        },
        {"event": "scaled", "pool": "reward", "replicas": 2, "source": "auto"},
        {"event": "autoscaled", "pool": "reward", "from": 1, "to": 2, "reason": "the learner waited"},
        {"event": "scaled", "pool": "generation", "replicas": 3, "source": "manual"},
        {"event": "scaled", "pool": "reference", "replicas": 2, "source": "manual"},
    ]
    assert describe_pools(events) == [
        "pools:",
        "  generation: 3 workers, pinned (rlhf-cluster scale; --auto releases it)",
        "  reward: 2 workers, auto; last decision 1 -> 2: the learner waited",
        "  reference: 2 workers, fixed",
    ]
    released = describe_pools([*events, {"event": "scale_released", "pool": "generation"}])
    assert released[1] == "  generation: 3 workers, auto"
    with_spares = [{**events[0], "spares": {"generation": 1, "reward": 0}}, *events[1:]]
    assert describe_pools(with_spares)[1].startswith("  generation: 3 workers + 1 spare, pinned")
    assert describe_pools(with_spares)[2].startswith("  reward: 2 workers, auto")
    assert describe_pools([{"event": "resumed"}]) == []


async def _no_info() -> dict:
    return {}


class _FakePool:
    """An ActorPool's size and resize, with actors that answer only `info`."""

    def __init__(self, size: int):
        self.resize_to(size)
        self.spares: dict = {}

    def resize_to(self, size: int) -> None:
        self.actors = {f"r{i}": SimpleNamespace(info=SimpleNamespace(remote=_no_info)) for i in range(size)}

    def __len__(self) -> int:
        return len(self.actors)

    async def resize(self, replicas: int) -> list[str]:
        self.resize_to(replicas)
        return []


def test_a_manual_scale_pins_the_pool_and_auto_releases_it_through_the_clusters_path(tmp_path):
    """`Cluster._watch_scaling` with a fake controller: a size pins the pool (the autoscaler's
    next decision for it is not applied), a request without one releases it."""
    from actors.cluster import Cluster

    requests = [(0, "reward", 3), (1, "reward", None)]
    outcomes: dict[int, dict] = {}

    async def next_request():
        if not requests:
            raise asyncio.CancelledError
        return requests.pop(0)

    async def applied(ticket, outcome):
        outcomes[ticket] = outcome

    cluster = Cluster.__new__(Cluster)
    cluster.pools = {"reward": _FakePool(1)}
    cluster.infos = {"reward": {}}
    cluster.other_targets = dict
    cluster.controller = SimpleNamespace(
        next_request=SimpleNamespace(remote=next_request), applied=SimpleNamespace(remote=applied)
    )
    cluster.cfg = JobConfig(name="t", scaling={"auto": {"reward": {"enabled": True}}})
    cluster.run_dir = RunDir(tmp_path, tmp_path / "w", tmp_path / "c")
    cluster.autoscaling = PoolAutoscaling(cluster.cfg, cluster.run_dir, cluster.pool_sizes, cluster._resize)

    async def watch():
        cluster._resizing = asyncio.Lock()
        with pytest.raises(asyncio.CancelledError):
            await cluster._watch_scaling(lambda: 7)

    asyncio.run(watch())
    assert outcomes[0]["sizes"] == {"reward": 3} and outcomes[0]["auto"] == []  # pinned
    assert outcomes[1]["changed"] == [] and outcomes[1]["auto"] == ["reward"]  # released, not resized
    scaled = [e for e in cluster.run_dir.read(RunDir.EVENTS) if e["event"] == "scaled"]
    assert [(e["replicas"], e["source"]) for e in scaled] == [(3, "manual")]
