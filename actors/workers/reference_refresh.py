"""The KL reference's model folder through a run (`algorithm.kl.reference_refresh`): which folder
the reference pool loads, its refreshes, and the folder a resumed or rebuilt learner's version
calls for. The folders themselves are the library's (`rlhf_cluster/weights/reference_refresh.py`).

Each refresh is a task of the job's TaskGroup (a failure ends the job with its cause): it waits
until the policy's version is durable in the store, writes the refreshed folder (in a thread),
then every reference worker and spare loads it; a worker that starts meanwhile loads it before
it serves (`join`). Refreshes run one at a time, in order; a checkpoint waits for the one in
flight (`settled`), so every checkpoint's version finds its reference written.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import ray

from rlhf_cluster.config import JobConfig
from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.weights import WeightStore
from rlhf_cluster.weights.export import reference_version_of
from rlhf_cluster.weights.reference_refresh import (
    discard_after,
    folder_of,
    prune_before,
    reference_folder,
    write_reference,
)

log = logging.getLogger(__name__)


class ReferenceRefresh:
    """The reference pool's folder: `base` (the model the job started from) until the first
    refresh; `version`: the weight version the job starts at (a resume's checkpoint's), whose
    reference is loaded by the pool's first workers. `oldest_kept()`: the version of the oldest
    checkpoint kept (None: none), below whose reference no folder is needed."""

    def __init__(
        self,
        cfg: JobConfig,
        run_dir: RunDir,
        store: WeightStore,
        base: str,
        version: int,
        oldest_kept: Callable[[], int | None],
    ):
        refresh = cfg.algorithm.kl.reference_refresh
        self.every, self.mix = (refresh.every_steps, refresh.mix) if refresh is not None else (0, 1.0)
        self.root, self.store, self.base, self.oldest_kept = run_dir.root / RunDir.REFERENCE, store, base, oldest_kept
        self.run_dir = run_dir
        self.pool: Any = None  # the reference pool (`serve`); None: the job runs none
        self._task: asyncio.Task | None = None
        self.timeline = 0  # bumped by `restore`: a refresh of an abandoned timeline switches nothing
        self.current = self._restored(version)

    @property
    def version(self) -> int:
        """The weight version the reference is from now (0: the model the job started from)."""
        return reference_version_of(self.current)

    def model_path(self, slot: int) -> str:
        """The folder a new reference worker starts from (any slot)."""
        return self.current

    def serve(self, pool: Any) -> None:
        self.pool = pool

    def due(self, version: int) -> bool:
        """Whether the policy's `version` refreshes the reference."""
        return self.every > 0 and version % self.every == 0

    def refresh(
        self,
        tg: asyncio.TaskGroup,
        version: int,
        publishing: asyncio.Task | None,
        persisted: Callable[[], Awaitable[None]],
    ) -> None:
        """Refresh the reference from `version` once it is durable in the store: after `publishing`
        (its publication) and `persisted()` (the learner's store writes queued so far)."""
        self._task = tg.create_task(self._refresh(version, _durable(publishing, persisted), self._task, self.timeline))

    async def settled(self) -> None:
        """Until the refresh in flight (if any) is done."""
        if self._task is not None and not self._task.done():
            await asyncio.wait([self._task])

    async def restore(self, version: int) -> None:
        """A rebuilt learner continues from `version`: refreshes after it are removed and the pool
        loads the reference `version` calls for."""
        if not self.every:
            return
        self.timeline += 1
        await self.settled()  # a write in flight finishes before its folder is judged (its thread cannot stop)
        self._task = None
        await self._switch(self._restored(version))

    async def join(self, worker: Any) -> None:
        """A new reference worker holds the current folder before it serves (loaded again if a
        refresh moved it meanwhile)."""
        while True:
            held = await worker.load_model.remote(self.current)
            if held == self.current:
                return

    def _restored(self, version: int) -> str:
        if not self.every:
            return self.base
        gone = discard_after(self.root, version)
        if gone:
            log.info(f"reference refreshes after weight version {version} removed (an abandoned run's): {gone}")
        return str(reference_folder(self.root, self.base, version, self.every))

    async def _refresh(
        self, version: int, durable: Awaitable[None], previous: asyncio.Task | None, timeline: int
    ) -> None:
        try:
            await durable
        except ray.exceptions.RayActorError:
            return  # the learner died: its rebuild restores the reference its checkpoint calls for
        if timeline != self.timeline:
            return
        lease = f"reference-refresh-queued-{version}"
        try:
            self.store.acquire(version, lease)  # retention keeps the version while earlier refreshes finish
        except FileNotFoundError:
            raise FileNotFoundError(
                f"weight store {self.store.root}: version {version} is gone before the reference refresh read it "
                "(raise weights.keep)"
            ) from None
        try:
            if previous is not None:  # in order: this one mixes with the one before (its failure: the TaskGroup's)
                await asyncio.wait([previous])
            if timeline == self.timeline:
                await self._write_and_switch(version, timeline)
        finally:
            self.store.release(version, lease)

    async def _write_and_switch(self, version: int, timeline: int) -> None:
        began, out = time.perf_counter(), folder_of(self.root, version)
        if not out.is_dir():
            await asyncio.to_thread(
                write_reference, self.store, version, Path(self.base), Path(self.current), self.mix, out
            )
        if timeline != self.timeline:
            return  # a rollback meanwhile; `restore` removes the folder if its version was abandoned
        await self._switch(str(out))
        seconds = time.perf_counter() - began
        self.run_dir.event("reference_refreshed", version=version, mix=self.mix, seconds=round(seconds, 3))
        log.info(f"KL reference refreshed from weight version {version} (mix {self.mix:g}) in {seconds:.1f} s")
        oldest = self.oldest_kept()
        if oldest is not None:
            prune_before(self.root, oldest, self.every)

    async def _switch(self, folder: str) -> None:
        """Every reference worker and spare loads `folder`; a dead one is its pool's to replace (its
        replacement starts from `folder`)."""
        self.current = folder
        if self.pool is None:
            return
        actors = [*self.pool.actors.values(), *self.pool.spares.values()]
        loads = await asyncio.gather(*(a.load_model.remote(folder) for a in actors), return_exceptions=True)
        for result in loads:
            if isinstance(result, BaseException) and not isinstance(result, ray.exceptions.RayActorError):
                raise result


async def _durable(publishing: asyncio.Task | None, persisted: Callable[[], Awaitable[None]]) -> None:
    if publishing is not None:
        await asyncio.wait([publishing])
    await persisted()
