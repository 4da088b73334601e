"""The KL reference's model folder through a run (`algorithm.kl.reference_refresh`): which folder
the reference pool loads, its refreshes, and the folder a resumed or rebuilt learner's version
calls for. The folders themselves are the library's (`rlhf_cluster/weights/reference_refresh.py`).

Each refresh is a task of the job's TaskGroup (a failure ends the job with its cause): it waits
until the policy's version is durable in the store, writes the refreshed folder (in a thread),
then every reference worker and spare loads it; a worker that starts meanwhile loads it before
it serves (`join`). Refreshes run one at a time, in order, each leasing its version meanwhile; a
checkpoint waits for the writes in flight (`written`), so every checkpoint's version finds its
reference written. A learner rebuild (`abandon`, then `restore`) waits for every refresh in
flight, whose folders its version does not call for are removed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray

from actors.workers.pools import STARTUP_TIMEOUT_S
from rlhf_cluster.config import JobConfig
from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.telemetry import metrics as m
from rlhf_cluster.weights import WeightStore
from rlhf_cluster.weights.export import folder_weights
from rlhf_cluster.weights.reference_refresh import (
    discard_after,
    folder_of,
    prune,
    reference_folder,
    reference_version,
    write_reference,
)

log = logging.getLogger(__name__)


class ReferenceRefresh:
    """The reference pool's folder: `base` (the model the job started from) until the first
    refresh; `version`: the weight version the job starts at (a resume's checkpoint's), whose
    reference is loaded by the pool's first workers. `kept_versions()`: the weight versions of the
    checkpoints kept, whose references are kept with the current one (the rest are removed)."""

    def __init__(
        self,
        cfg: JobConfig,
        run_dir: RunDir,
        store: WeightStore,
        base: str,
        version: int,
        kept_versions: Callable[[], list[int]],
    ):
        refresh = cfg.algorithm.kl.reference_refresh
        self.every, self.mix = (refresh.every_steps, refresh.mix) if refresh is not None else (0, 1.0)
        self.root, self.store, self.base, self.run_dir = run_dir.root / RunDir.REFERENCE, store, base, run_dir
        self.kept_versions = kept_versions
        self.labels = m.MetricLabels(job=cfg.name, pool="driver", worker="driver")
        self.pool: Any = None  # the reference pool (`serve`); None: the job runs none
        self._tasks: list[asyncio.Task] = []  # refreshes in flight, in order
        self._writes: list[asyncio.Future] = []  # each one's folder written (or not to be)
        self.timeline = 0  # bumped by `abandon`: a refresh of an abandoned timeline writes and switches nothing
        self._handed_out: dict[int, float] = {}  # reference version -> when a starting worker was last given its folder
        if self.every:
            folder_weights(Path(base))  # a model folder a refresh cannot read fails now, not at the first refresh
        self.current, self.version = self._restored(version)

    def model_path(self, slot: int) -> str:
        """The folder a new reference worker starts from (any slot). Its constructor may read it for
        up to the pool's start-up bound, through any number of refreshes: kept that long."""
        self._handed_out[self.version] = time.monotonic()
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
        written = asyncio.get_running_loop().create_future()
        previous = self._tasks[-1] if self._tasks else None
        durable = _durable(publishing, persisted)
        self._tasks.append(tg.create_task(self._refresh(version, durable, previous, self.timeline, written)))
        self._writes.append(written)
        self._tasks = [t for t in self._tasks if not t.done()]
        self._writes = [w for w in self._writes if not w.done()]

    async def written(self) -> None:
        """Until every refresh in flight has written its folder (a checkpoint waits for this: a resume
        from it finds its version's reference), not for the workers' loads."""
        if pending := [w for w in self._writes if not w.done()]:
            await asyncio.wait(pending)

    async def abandon(self) -> None:
        """The learner is being rebuilt (a rollback, a lost rank): refreshes in flight write and
        switch nothing more; returns once each has ended (a write's thread cannot be stopped)."""
        self.timeline += 1
        if pending := [t for t in self._tasks if not t.done()]:
            await asyncio.wait(pending)
        self._tasks, self._writes = [], []

    async def restore(self, version: int) -> None:
        """A rebuilt learner continues from `version`: refreshes after it are removed and the pool
        loads the reference `version` calls for."""
        if not self.every:
            return
        await self.abandon()
        folder, self.version = self._restored(version)
        await self._switch(folder)

    async def join(self, worker: Any) -> None:
        """A new reference worker holds the current folder before it serves (loaded again if a
        refresh moved it meanwhile)."""
        while True:
            held = await worker.load_model.remote(self.current)
            if held == self.current:
                return

    def _restored(self, version: int) -> tuple[str, int]:
        """The folder and version of the reference of policy `version`, refreshes after it (and
        temp folders a killed write left) removed."""
        if not self.every:
            return self.base, 0
        gone = discard_after(self.root, version)
        if gone:
            log.info(f"reference refreshes after weight version {version} removed (an abandoned run's): {gone}")
        return str(reference_folder(self.root, self.base, version, self.every)), reference_version(version, self.every)

    async def _refresh(
        self,
        version: int,
        durable: Awaitable[None],
        previous: asyncio.Task | None,
        timeline: int,
        written: asyncio.Future,
    ) -> None:
        try:
            try:
                await durable
            except ray.exceptions.RayActorError:
                return  # the learner died: its rebuild restores the reference its checkpoint calls for
            if timeline != self.timeline:
                return
            with self._leased(version):  # retention keeps the version while earlier refreshes finish
                if previous is not None:  # in order: this one mixes with the one before (its failure: the TaskGroup's)
                    await asyncio.wait([previous])
                if timeline == self.timeline:
                    await self._write(version)
        except Exception:
            if timeline == self.timeline:
                raise
            return  # abandoned meanwhile: the rollback removed what it read (the store's later versions)
        finally:
            if not written.done():
                written.set_result(None)
        if timeline != self.timeline:
            return  # abandoned while writing: `restore` removes the folder
        before = self.version
        await self._switch(str(folder_of(self.root, version)), version, timeline)
        if timeline != self.timeline:
            return
        # Kept: the kept checkpoints' references, this one, the one before (a worker may still be loading
        # it) and those a worker still starting may be reading.
        kept = [*self.kept_versions(), before, version, *self._starting()]
        await asyncio.to_thread(prune, self.root, self.every, kept)

    def _starting(self) -> list[int]:
        """The reference versions given to a worker start within the pool's start-up bound (a
        constructor that takes longer is killed)."""
        since = time.monotonic() - STARTUP_TIMEOUT_S
        self._handed_out = {v: t for v, t in self._handed_out.items() if t >= since}
        return list(self._handed_out)

    @contextmanager
    def _leased(self, version: int) -> Iterator[None]:
        reader = f"reference-refresh-queued-{version}"
        try:
            self.store.acquire(version, reader)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"weight store {self.store.root}: version {version} is gone before the reference refresh read it "
                "(raise weights.keep)"
            ) from None
        try:
            yield
        finally:
            self.store.release(version, reader)

    async def _write(self, version: int) -> None:
        began, out = time.perf_counter(), folder_of(self.root, version)
        previous = Path(self.current)
        await asyncio.to_thread(write_reference, self.store, version, Path(self.base), previous, self.mix, out)
        seconds = time.perf_counter() - began
        self.run_dir.event("reference_refreshed", version=version, mix=self.mix, seconds=round(seconds, 3))
        self.labels.of(m.REFERENCE_REFRESH_SECONDS).observe(seconds)
        log.info(f"KL reference refreshed from weight version {version} (mix {self.mix:g}): written in {seconds:.1f} s")

    async def _switch(self, folder: str, version: int | None = None, timeline: int | None = None) -> None:
        """Every reference worker and spare loads `folder`; a dead one is its pool's to replace (its
        replacement starts from `folder`). A load's failure ends the job, unless `timeline` (the
        refresh's) was abandoned meanwhile."""
        self.current = folder
        if version is not None:
            self.version = version
        if self.pool is None:
            return
        actors = [*self.pool.actors.values(), *self.pool.spares.values()]
        loads = await asyncio.gather(*(a.load_model.remote(folder) for a in actors), return_exceptions=True)
        for result in loads:
            live = timeline is None or timeline == self.timeline
            if isinstance(result, BaseException) and not isinstance(result, ray.exceptions.RayActorError) and live:
                raise result


async def _durable(publishing: asyncio.Task | None, persisted: Callable[[], Awaitable[None]]) -> None:
    if publishing is not None:
        await asyncio.wait([publishing])
    await persisted()
