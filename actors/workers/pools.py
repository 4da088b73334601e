"""ActorPool: same-kind actors with least-busy dispatch that can grow and shrink while serving.

Dispatch goes through `call`, so the pool knows each actor's requests in flight: a retired
actor leaves the rotation at once but is killed only after its last request has returned, so
no request is lost when a pool shrinks.

Warm spares (`spares`): actors started and prepared like the others (for generation: loaded with
every weight version, which reaches them as it reaches the pool) but out of rotation. A worker
that dies or hangs is replaced by a spare at once, and a grow takes spares first; each spare
taken is made again behind it, in the background.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import ray

from actors.workers._common import heartbeat
from rlhf_cluster.config import FaultsConfig, ResourcesConfig
from rlhf_cluster.telemetry.liveness import HungWorkerError
from rlhf_cluster.telemetry.tracing import PoolActivity

STARTUP_TIMEOUT_S = 900  # a new worker's constructor (model load, engine start) must finish within this
SPARE_CHECK_S = 2.0  # a spare answers a heartbeat within this before it stands in, or it is lost


def actor_options(res: ResourcesConfig) -> dict[str, Any]:
    """Ray options for one actor of a pool from its resources config."""
    opts: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if res.custom:
        opts["resources"] = dict(res.custom)
    return opts


async def _all(awaitables: list) -> list:
    """`gather` awaited inside a coroutine: cancelled (a spare being made when the job ends), its
    CancelledError is taken here, not left on the gather's future to be logged as never retrieved."""
    return await asyncio.gather(*awaitables)


class ActorPool:
    """Actors created by `factory(index, slot)`; names are `{prefix}{index}` and never reused. The
    slot is the index of the worker a replacement stands in for (its own index otherwise), so a
    per-replica setting (e.g. `generation.quantization: [none, int8]`) survives restarts."""

    def __init__(
        self,
        name: str,
        prefix: str,
        factory: Callable[[int, int], Any],
        *,
        prepare: Callable[[Any], Awaitable[None]] | None = None,
        max_restarts: int = 0,
        backoff_s: float = 0.0,
        on_restart: Callable[[str, str, bool], None] | None = None,  # (dead, new, a spare?)
        activity: PoolActivity | None = None,
        spares: int = 0,
        kind_of: Callable[[int], Any] = lambda slot: None,
        on_spares: Callable[[str | None], Awaitable[None]] | None = None,
    ):
        self.name = name
        self.activity = activity or PoolActivity()  # when each worker had a request in flight (busy share)
        self.prefix = prefix
        self._factory = factory
        self.prepare = prepare  # run on every new actor before it serves (e.g. load weights)
        self.max_restarts = max_restarts
        self.backoff_s = backoff_s
        self.on_restart = on_restart
        self.restarts = 0
        self._next_index = 0
        self.slot_of: dict[str, int] = {}  # worker name -> slot
        self.actors: dict[str, Any] = {}  # in rotation
        # Retired from rotation, still finishing their requests: they keep receiving new weight
        # versions, since a request may be waiting for one before it can finish.
        self.draining: dict[str, Any] = {}
        self._in_flight: dict[str, int] = {}
        self._turn = 0
        self._drained = asyncio.Condition()
        self.spares_wanted = spares
        self.spares: dict[str, Any] = {}  # started and prepared, out of rotation
        # A spare stands in only for a worker of its kind (what a slot's worker is built from:
        # e.g. int8 or full weights), so a per-replica setting survives it.
        self.kind_of = kind_of
        self.on_spares = on_spares  # after the spares changed: one made (None) or lost (its name)
        self._refills: set[asyncio.Task] = set()

    def __len__(self) -> int:
        return len(self.actors)

    def create(self, count: int, replacing: str | None = None) -> dict[str, Any]:
        """Start `count` new actors (not yet in rotation); with `replacing`, one in that worker's slot."""
        created = {}
        for _ in range(count):
            index = self._next_index
            slot = self.slot_of.get(replacing, index) if replacing else index
            name = f"{self.prefix}{index}"
            created[name] = self._factory(index, slot)
            self.slot_of[name] = slot
            self._next_index += 1
        return created

    async def _create_prepared(self, count: int, replacing: str | None = None) -> dict[str, Any]:
        """Start `count` actors and `prepare` them; none is leaked if that fails or is cancelled."""
        created = self.create(count, replacing)
        try:
            # Started (its constructor done: a model loaded, an engine up) before it counts: a
            # heartbeat is answered only then, and an actor still starting is not a hung one.
            async with asyncio.timeout(STARTUP_TIMEOUT_S):
                await _all([actor.heartbeat.remote() for actor in created.values()])
            if self.prepare is not None:
                await asyncio.gather(*[self.prepare(actor) for actor in created.values()])
        except BaseException:
            for actor in created.values():
                ray.kill(actor, no_restart=True)
            raise
        return created

    def activate(self, actors: dict[str, Any]) -> None:
        """Put ready actors into rotation."""
        for name, actor in actors.items():
            self.actors[name] = actor
            self._in_flight.setdefault(name, 0)

    def start(self, count: int) -> dict[str, Any]:
        """Create and activate `count` actors, and the spares (at job start, before anything is
        dispatched; the job's first weights reach the spares as they reach the others). Returns
        every actor created, the spares included."""
        created = self.create(count)
        self.activate(created)
        self.spares.update(self.create(self.spares_wanted))
        return {**created, **self.spares}

    async def _take_spare(self, kind: Any = None, any_kind: bool = False) -> dict[str, Any]:
        """The oldest live spare of `kind` (or of any kind), out of the spares, and a new one
        started behind it in its slot; empty when there is none. A spare that does not answer a
        heartbeat at once died with its node or process (a lost raylet takes its spares too): it is
        lost, made again behind, and the next one is tried."""
        for name, actor in list(self.spares.items()):
            if not (any_kind or self.kind_of(self.slot_of[name]) == kind):
                continue
            beat = await heartbeat(actor, SPARE_CHECK_S)
            if self.spares.get(name) is not actor:
                continue  # taken or lost meanwhile
            if not beat.answered:
                await self._lose_spare(name, actor, RuntimeError(f"{self.name} spare {name} did not answer"))
                continue
            del self.spares[name]
            self._refill(replacing=name)
            return {name: actor}
        return {}

    async def _lose_spare(self, name: str, actor: Any, cause: BaseException) -> None:
        """A dead or hung spare: out, killed, made again behind (a restart of the pool's)."""
        self._count_restart(f"spare {name}", cause)
        del self.spares[name]
        ray.kill(actor, no_restart=True)
        self._refill(replacing=name)
        if self.on_spares is not None:
            await self.on_spares(name)

    def _count_restart(self, who: str, cause: BaseException) -> None:
        """One more restart of the pool's, or the job's end when none is left."""
        if self.restarts >= self.max_restarts:
            raise RuntimeError(
                f"{self.name} pool: {who} died and the {self.max_restarts} allowed restarts are used up"
            ) from cause
        self.restarts += 1

    def _refill(self, replacing: str) -> None:
        """Start a spare in `replacing`'s slot, in the background; `watch` raises its failure."""
        task = asyncio.get_running_loop().create_task(self._add_spare(replacing))
        self._refills.add(task)

    async def _add_spare(self, replacing: str) -> None:
        created = await self._create_prepared(1, replacing=replacing)
        self.spares.update(created)
        if self.on_spares is not None:
            await self.on_spares(None)

    def _check_refills(self) -> None:
        """A spare that failed to start ends the job with its cause, as a failed replacement does."""
        for task in [t for t in self._refills if t.done()]:
            self._refills.discard(task)
            task.result()

    async def call(self, method: str, *args) -> tuple[str, Any]:
        """Call `method` on the next actor in rotation; returns (actor name, result).

        If the actor dies, it is replaced (up to `max_restarts` over the pool's life) and the
        request is retried on another actor; the caller sees an error only when no restart is
        left. Retried generation makes new sample ids, retried scoring returns the same
        samples again, so a retry can never put a sample into the buffer twice.
        """
        while True:
            if not self.actors:
                async with self._drained:
                    await self._drained.wait_for(lambda: bool(self.actors))
            # The least busy actor, ties broken in rotation: a worker stuck on a long request
            # gets no more until the others have caught up.
            names = list(self.actors)
            start = self._turn % len(names)
            self._turn += 1
            name = min(names[start:] + names[:start], key=lambda n: self._in_flight[n])
            actor = self.actors[name]
            self._in_flight[name] += 1
            busy = self.activity.begin(self.name, name)
            try:
                return name, await getattr(actor, method).remote(*args)
            except ray.exceptions.RayActorError as exc:
                await self._replace(name, actor, exc)
            finally:
                self.activity.end(busy)
                self._in_flight[name] -= 1
                async with self._drained:
                    self._drained.notify_all()

    async def _replace(self, name: str, actor: Any, cause: BaseException) -> None:
        """Swap a dead actor for a spare of its kind, or else a new one (the first caller to see it
        dead does the work). A dead spare is made again behind, in the background."""
        if self.spares.get(name) is actor:
            return await self._lose_spare(name, actor, cause)
        if self.actors.get(name) is not actor:
            return  # already replaced by a concurrent call, or retired
        self._count_restart(f"worker {name}", cause)
        del self.actors[name]
        created = await self._take_spare(self.kind_of(self.slot_of[name]))
        spare = bool(created)
        if spare:
            self.slot_of[next(iter(created))] = self.slot_of[name]
        else:
            await asyncio.sleep(self.backoff_s * 2 ** (self.restarts - 1))
            created = await self._create_prepared(1, replacing=name)
        self.activate(created)
        if self.on_restart is not None:
            self.on_restart(name, next(iter(created)), spare)
        async with self._drained:
            self._drained.notify_all()

    async def watch(
        self,
        faults: FaultsConfig,
        on_hung: Callable[[str, str, float, float], None],
        on_spans: Callable[[list[dict]], None] = lambda spans: None,
    ) -> None:
        """Heartbeat every worker in rotation each `faults.heartbeat_interval_s`; one that does not
        answer within `heartbeat_timeout_s`, or whose engine is stalled past `stall_timeout_s`, is
        killed and replaced (its requests in flight fail over to the others and are retried, as
        when a worker dies). `on_hung(dead, reason, detected_s, replaced_s)`: detected_s is the
        time since its last good heartbeat, replaced_s from the kill to its replacement serving.
        The trace spans the heartbeats bring back go to `on_spans`."""
        last_ok: dict[str, float] = {}
        while True:
            started = time.monotonic()
            self._check_refills()
            watched = {**self.actors, **self.spares}
            names = list(watched)
            beats = await asyncio.gather(*[heartbeat(watched[n], faults.heartbeat_timeout_s) for n in names])
            on_spans([span for beat in beats for span in beat.spans])
            for name, beat in zip(names, beats):
                reason = beat.hung(faults.stall_timeout_s)
                actor = self.actors.get(name, self.spares.get(name))
                if beat.dead and actor is not None and name in self.spares:
                    # Nobody calls a spare, so nobody else would see it dead: made again behind.
                    await self._replace(name, actor, RuntimeError(f"{self.name} spare {name} died"))
                    continue
                if reason is None:
                    last_ok[name] = time.monotonic()
                    continue
                if actor is None:
                    continue  # replaced or retired meanwhile
                detected = time.monotonic() - last_ok.pop(name, started)
                ray.kill(actor, no_restart=True)
                killed = time.monotonic()
                await self._replace(name, actor, HungWorkerError(f"{self.name} worker {name}: {reason}"))
                on_hung(name, reason, detected, time.monotonic() - killed)
            await asyncio.sleep(max(0.0, faults.heartbeat_interval_s - (time.monotonic() - started)))

    async def retire(self, count: int) -> list[str]:
        """Take the newest `count` actors out of rotation, wait for their requests, kill them."""
        if count >= len(self.actors):
            raise ValueError(f"{self.name} pool: cannot retire {count} of {len(self.actors)} actors (one must stay)")
        leaving = list(self.actors)[-count:] if count else []
        handles = {name: self.actors.pop(name) for name in leaving}
        self.draining.update(handles)
        try:
            async with self._drained:
                await self._drained.wait_for(lambda: all(self._in_flight[n] == 0 for n in leaving))
        finally:
            for name in leaving:
                self.draining.pop(name, None)
        for actor in handles.values():
            ray.kill(actor, no_restart=True)
        return leaving

    async def resize(self, replicas: int) -> list[str]:
        """Grow (spares first, then new actors, `prepare`d, e.g. loaded with the newest weights,
        before serving) or shrink."""
        if replicas < 1:
            raise ValueError(f"{self.name} pool: replicas must be >= 1, got {replicas}")
        if replicas > len(self.actors):
            added: list[str] = []
            while len(self.actors) < replicas and self.spares:
                spare = await self._take_spare(any_kind=True)
                if not spare:
                    break  # the spares left were lost
                self.activate(spare)
                added += spare
            created = await self._create_prepared(replicas - len(self.actors))
            self.activate(created)
            return added + list(created)
        return await self.retire(len(self.actors) - replicas)

    def kill(self) -> None:
        for task in self._refills:
            task.cancel()  # its half-started actor is killed as it is cancelled
        for actor in [*self.actors.values(), *self.spares.values()]:
            ray.kill(actor, no_restart=True)
        self.actors.clear()
        self.spares.clear()
