"""The reference pool through refreshes (`actors/workers/reference_refresh.ReferenceRefresh`): a
refresh writes its folder once the version is durable, then every worker and spare loads it; a
worker that starts meanwhile loads the newest before it serves; a rebuilt learner's version puts
back the reference it calls for; a refresh a rollback abandoned switches nothing; a resume starts
from its checkpoint's. Real folders and a real WeightStore; fake actor handles (the bookkeeping,
not Ray's)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
import safetensors.torch

from actors.workers import reference_refresh as refresh_module
from actors.workers.reference_refresh import ReferenceRefresh
from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.weights.reference_refresh import folder_of, written
from rlhf_cluster.weights.store import WeightStore
from tests.fakes import RemoteMethod


class _Worker:
    """A reference worker's handle: `load_model` loads a folder it does not hold (recorded) and
    answers the one it holds, or raises as a dead actor does."""

    def __init__(self, holds: str, on_load=None):
        self.holds, self.loads, self.dead, self.on_load = holds, [], False, on_load
        self.load_model = RemoteMethod(self._load)

    async def _load(self, folder: str) -> str:
        if self.dead:
            raise ray.exceptions.RayActorError()
        await asyncio.sleep(0)
        if folder == self.holds:
            return folder
        if self.on_load is not None:
            await self.on_load(folder)
        self.holds = folder
        self.loads.append(folder)
        return folder


def _refresher(tmp_path, tiny_model_path, version=0, every=2, mix=1.0, kept=(), job_config=None):
    refresh = {"every_steps": every, "mix": mix}
    cfg = job_config(reference=True, algorithm={"kl": {"coef": 0.01, "reference_refresh": refresh}})
    run_dir = RunDir(tmp_path / "run", tmp_path / "weights", tmp_path / "ckpt")
    run_dir.root.mkdir(parents=True, exist_ok=True)
    store = WeightStore(tmp_path / "weights", keep=10)
    base = safetensors.torch.load_file(str(Path(tiny_model_path) / "model.safetensors"))
    for v in range(1, 9):
        if not store.version_dir(v).is_dir():
            store.publish(v, {k: t + 0.001 * v for k, t in base.items()})
    return ReferenceRefresh(cfg, run_dir, store, tiny_model_path, version, lambda: list(kept)), run_dir


async def _persisted() -> None:
    return None


async def _refreshed(ref: ReferenceRefresh, *versions: int) -> None:
    async with asyncio.TaskGroup() as tg:
        for v in versions:
            ref.refresh(tg, v, None, _persisted)


def test_a_refresh_is_written_then_loaded_by_every_worker_and_spare(tmp_path, tiny_model_path, job_config):
    ref, run_dir = _refresher(tmp_path, tiny_model_path, job_config=job_config)
    workers, spare = [_Worker(tiny_model_path), _Worker(tiny_model_path)], _Worker(tiny_model_path)
    workers[1].dead = True  # its pool replaces it: the replacement starts from the current folder
    ref.serve(SimpleNamespace(actors={"ref0": workers[0], "ref1": workers[1]}, spares={"ref2": spare}))
    assert [ref.due(v) for v in range(1, 5)] == [False, True, False, True] and ref.version == 0
    asyncio.run(_refreshed(ref, 2, 4))
    v2, v4 = str(folder_of(ref.root, 2)), str(folder_of(ref.root, 4))
    assert workers[0].loads == [v2, v4] and spare.loads == [v2, v4]
    assert ref.model_path(slot=5) == v4 and ref.version == 4
    assert [(e["event"], e["version"]) for e in run_dir.read(RunDir.EVENTS)] == [
        ("reference_refreshed", 2), ("reference_refreshed", 4)]  # fmt: skip


def test_a_worker_that_starts_during_a_refresh_serves_the_newest(tmp_path, tiny_model_path, job_config):
    ref, _ = _refresher(tmp_path, tiny_model_path, job_config=job_config)
    ref.serve(SimpleNamespace(actors={}, spares={}))

    async def scenario():
        async def moved_meanwhile(folder):
            if folder == tiny_model_path:
                await _refreshed(ref, 2)  # the refresh switches while this worker loads the old folder

        joining = _Worker("nothing yet", on_load=moved_meanwhile)
        await ref.join(joining)
        return joining

    joining = asyncio.run(scenario())
    assert joining.loads == [tiny_model_path, str(folder_of(ref.root, 2))]


def test_a_rebuilt_learner_puts_back_its_versions_reference(tmp_path, tiny_model_path, job_config):
    ref, _ = _refresher(tmp_path, tiny_model_path, kept=[1, 5], job_config=job_config)
    worker = _Worker(tiny_model_path)
    ref.serve(SimpleNamespace(actors={"ref0": worker}, spares={}))

    async def scenario():
        await _refreshed(ref, 2, 4, 6)
        await ref.restore(5)  # a rollback to the checkpoint of version 5: 6's refresh was the abandoned run's
        assert list(written(ref.root)) == [4] and worker.holds == str(folder_of(ref.root, 4))
        await ref.restore(1)
        assert list(written(ref.root)) == [] and worker.holds == tiny_model_path

    asyncio.run(scenario())


def test_retention_keeps_the_kept_checkpoints_references_the_current_and_the_one_before(
    tmp_path, tiny_model_path, job_config
):
    ref, _ = _refresher(tmp_path, tiny_model_path, kept=[3], job_config=job_config)
    ref.serve(SimpleNamespace(actors={}, spares={}))
    asyncio.run(_refreshed(ref, 2, 4, 6, 8))
    assert list(written(ref.root)) == [2, 6, 8]  # checkpoint 3 loads 2's; 8 is current, 6 was until now


def test_a_folder_a_worker_is_still_starting_from_is_kept_through_later_refreshes(
    tmp_path, tiny_model_path, job_config, monkeypatch
):
    ref, _ = _refresher(tmp_path, tiny_model_path, job_config=job_config)
    ref.serve(SimpleNamespace(actors={}, spares={}))

    async def scenario():
        await _refreshed(ref, 2)
        assert ref.model_path(slot=3) == str(folder_of(ref.root, 2))  # a replacement's constructor reads it from now
        await _refreshed(ref, 4, 6)
        assert list(written(ref.root)) == [2, 4, 6], "a folder a starting worker reads was removed"
        # Past the pool's start-up bound the constructor is killed if still running: the folder goes.
        monkeypatch.setattr(refresh_module, "STARTUP_TIMEOUT_S", 0)
        await _refreshed(ref, 8)
        assert list(written(ref.root)) == [6, 8]

    asyncio.run(scenario())


def test_a_refresh_a_rollback_abandons_switches_nothing(tmp_path, tiny_model_path, job_config):
    ref, _ = _refresher(tmp_path, tiny_model_path, job_config=job_config)
    worker = _Worker(tiny_model_path)
    ref.serve(SimpleNamespace(actors={"ref0": worker}, spares={}))

    async def scenario():
        published = asyncio.Event()

        async def persisted():
            await published.wait()

        async with asyncio.TaskGroup() as tg:
            ref.refresh(tg, 2, None, persisted)
            await asyncio.sleep(0)
            restoring = tg.create_task(ref.restore(1))  # rolled back before version 2 was durable
            await asyncio.sleep(0)
            published.set()
            await restoring

    asyncio.run(scenario())
    assert list(written(ref.root)) == [] and worker.loads == [] and ref.current == tiny_model_path


def test_a_dead_learner_leaves_the_reference_to_its_rebuild(tmp_path, tiny_model_path, job_config):
    ref, _ = _refresher(tmp_path, tiny_model_path, job_config=job_config)
    ref.serve(SimpleNamespace(actors={}, spares={}))

    async def died():
        raise ray.exceptions.RayActorError()

    async def scenario():
        async with asyncio.TaskGroup() as tg:
            ref.refresh(tg, 2, None, died)

    asyncio.run(scenario())  # no failure: the rebuild's `restore` decides
    assert list(written(ref.root)) == [] and ref.version == 0


def test_a_resume_starts_from_its_checkpoints_reference(tmp_path, tiny_model_path, job_config):
    first, _ = _refresher(tmp_path, tiny_model_path, job_config=job_config)
    first.serve(SimpleNamespace(actors={}, spares={}))
    asyncio.run(_refreshed(first, 2, 4, 6))
    resumed, _ = _refresher(tmp_path, tiny_model_path, version=5, job_config=job_config)
    assert resumed.current == str(folder_of(resumed.root, 4)) and list(written(resumed.root)) == [4]
    (folder_of(resumed.root, 4)).rename(tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match="the reference refreshed at weight version 4"):
        _refresher(tmp_path, tiny_model_path, version=5, job_config=job_config)


def _held_writes(monkeypatch, fail: bool = False) -> threading.Event:
    """Every folder write waits for the returned event (then writes, or raises as a removed version does)."""
    release, real = threading.Event(), refresh_module.write_reference

    def held(*args):
        assert release.wait(30)
        if fail:
            raise FileNotFoundError("weight store: version 2 is gone before the reference refresh read it")
        return real(*args)

    monkeypatch.setattr(refresh_module, "write_reference", held)
    return release


def test_a_rollback_waits_for_every_refresh_in_flight(tmp_path, tiny_model_path, job_config, monkeypatch):
    """One refresh writing, the next waiting for a learner that died: the rebuild's restore waits
    for the write too, so the abandoned folder it renames into place is removed, never reused."""
    ref, _ = _refresher(tmp_path, tiny_model_path, job_config=job_config)
    worker = _Worker(tiny_model_path)
    ref.serve(SimpleNamespace(actors={"ref0": worker}, spares={}))
    release = _held_writes(monkeypatch)

    async def died():
        raise ray.exceptions.RayActorError()

    async def scenario():
        async with asyncio.TaskGroup() as tg:
            ref.refresh(tg, 2, None, _persisted)  # writing (held)
            ref.refresh(tg, 4, None, died)
            await asyncio.sleep(0.05)
            restoring = tg.create_task(ref.restore(1))
            await asyncio.sleep(0.05)
            assert not restoring.done()  # the write of 2 is still running
            release.set()
            await restoring

    asyncio.run(scenario())
    assert list(written(ref.root)) == [] and worker.loads == [] and ref.current == tiny_model_path


def test_an_abandoned_refresh_that_fails_ends_nothing_and_a_live_one_ends_the_job(
    tmp_path, tiny_model_path, job_config, monkeypatch
):
    ref, _ = _refresher(tmp_path, tiny_model_path, job_config=job_config)
    ref.serve(SimpleNamespace(actors={}, spares={}))
    release = _held_writes(monkeypatch, fail=True)

    async def abandoned():
        async with asyncio.TaskGroup() as tg:
            ref.refresh(tg, 2, None, _persisted)
            await asyncio.sleep(0.05)
            abandoning = tg.create_task(ref.abandon())  # a rollback removed version 2 from the store meanwhile
            await asyncio.sleep(0)
            release.set()
            await abandoning

    asyncio.run(abandoned())  # no failure: the rollback's restore decides
    assert ref.version == 0

    async def live():
        async with asyncio.TaskGroup() as tg:
            ref.refresh(tg, 2, None, _persisted)

    with pytest.raises(ExceptionGroup) as failed:
        asyncio.run(live())
    assert "gone before the reference refresh read it" in str(failed.value.exceptions[0])


def test_a_checkpoint_waits_for_the_write_not_for_the_workers_loads(tmp_path, tiny_model_path, job_config):
    ref, _ = _refresher(tmp_path, tiny_model_path, job_config=job_config)
    loading = asyncio.Event()

    async def slow_load(folder):
        await loading.wait()

    worker = _Worker(tiny_model_path, on_load=slow_load)
    ref.serve(SimpleNamespace(actors={"ref0": worker}, spares={}))

    async def scenario():
        async with asyncio.TaskGroup() as tg:
            ref.refresh(tg, 2, None, _persisted)
            async with asyncio.timeout(30):
                await ref.written()
            assert folder_of(ref.root, 2).is_dir() and worker.loads == []  # written, not yet loaded
            loading.set()

    asyncio.run(scenario())
    assert worker.loads == [str(folder_of(ref.root, 2))] and ref.version == 2
