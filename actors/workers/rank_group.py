"""RankGroup: every torch.distributed group of Ray actors in the project (policy learner, critic,
SFT and reward-model stages, tests) is built, called and ended through this one class."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.workers._common import heartbeat
from rlhf_cluster.config import FaultsConfig, ResourcesConfig

PLACEMENT_TIMEOUT_S = 120
SETUP_TIMEOUT_S = 600  # loading and sharding a model on every rank


def deal(items: list, world: int) -> list[list]:
    """Round-robin shares: rank r gets items r, r + world, ..."""
    return [items[r::world] for r in range(world)]


def interleave(shares: list[list]) -> list:
    """Undo `deal`: item i came from share i % len(shares), position i // len(shares)."""
    out: list = [None] * sum(len(s) for s in shares)
    for r, share in enumerate(shares):
        out[r :: len(shares)] = share
    return out


class RankGroup:
    """A gang-placed group of rank actors forming one torch.distributed process group.

    Placement: one bundle per rank in one placement group, all placed or none (`section` names the
    config section in errors). Rendezvous: rank 0's `address()`. Setup: every rank's
    `setup(master_addr, master_port)` at once, returning its info (`name`, `metrics`, `pid`).
    Calls: `submit`/`call` send every rank the same arguments (collectives); `split`/`run` send
    rank r its own share. `kill` ends the ranks and frees the placement.
    """

    def __init__(
        self,
        actor_cls,
        rank_args: Callable[[int], tuple],
        resources: ResourcesConfig,
        world_size: int,
        section: str = "learner",
        placement_timeout_s: float = PLACEMENT_TIMEOUT_S,
    ):
        self.world_size, self.section = world_size, section
        self.ranks: list = []
        self.ended = False  # killed, or a rank was found hung (the group is lost either way)
        self.placement = _place(resources, world_size, section, placement_timeout_s)
        try:
            self.ranks = [
                actor_cls.options(**_rank_options(resources, self.placement, r)).remote(*rank_args(r))
                for r in range(world_size)
            ]
            addr, port = ray.get(self.ranks[0].address.remote(), timeout=SETUP_TIMEOUT_S)
            infos = ray.get([rank.setup.remote(addr, port) for rank in self.ranks], timeout=SETUP_TIMEOUT_S)
            self.infos: dict[str, dict] = {info["name"]: info for info in infos}
        except BaseException:
            self.kill()
            raise

    def __iter__(self):
        return iter(self.ranks)

    def __len__(self) -> int:
        return len(self.ranks)

    @property
    def leader(self):
        """Rank 0."""
        return self.ranks[0]

    def submit(self, method: str, *args) -> list[ray.ObjectRef]:
        """Every rank runs `method(*args)`; one ref per rank (awaitable)."""
        return [getattr(rank, method).remote(*args) for rank in self.ranks]

    def split(self, method: str, shares: list, *args) -> list[ray.ObjectRef]:
        """Rank r runs `method(shares[r], *args)`; one ref per rank (awaitable)."""
        if len(shares) != self.world_size:
            raise ValueError(f"{self.section}: {len(shares)} shares for {self.world_size} ranks")
        return [getattr(rank, method).remote(share, *args) for rank, share in zip(self.ranks, shares)]

    def call(self, method: str, *args, timeout: float | None = None) -> list[Any]:
        """`submit` and wait: every rank's result, in rank order."""
        return ray.get(self.submit(method, *args), timeout=timeout)

    def run(self, method: str, items: list, *args, timeout: float | None = None) -> list[Any]:
        """Deal `items` round-robin, run `method` on every share and gather the results in item order
        (each rank returns one result per item of its share)."""
        return interleave(ray.get(self.split(method, deal(items, self.world_size), *args), timeout=timeout))

    async def watch(
        self,
        faults: FaultsConfig,
        on_hung: Callable[[int, float], None],
        on_spans: Callable[[list[dict]], None] = lambda spans: None,
    ) -> None:
        """Heartbeat every rank until the group ends. A rank that does not answer within
        `faults.heartbeat_timeout_s` (stopped, wedged) is killed, so the group's call in flight
        fails as if it had died (the driver then rolls back); `on_hung(rank, seconds since its
        last good heartbeat)`; the trace spans the heartbeats bring back go to `on_spans`."""
        last_ok = [time.monotonic()] * self.world_size
        while not self.ended:
            started = time.monotonic()
            beats = await asyncio.gather(*[heartbeat(rank, faults.heartbeat_timeout_s) for rank in self.ranks])
            on_spans([span for beat in beats for span in beat.spans])
            if self.ended:
                return
            for r, beat in enumerate(beats):
                if beat.answered:
                    last_ok[r] = time.monotonic()
                    continue
                if beat.dead:  # the group's call in flight fails by itself
                    return
                self.ended = True
                ray.kill(self.ranks[r], no_restart=True)
                on_hung(r, time.monotonic() - last_ok[r])
                return
            await asyncio.sleep(max(0.0, faults.heartbeat_interval_s - (time.monotonic() - started)))

    def pids(self) -> list[int]:
        return [info["pid"] for info in self.infos.values()]

    def kill(self) -> None:
        self.ended = True
        for rank in self.ranks:
            ray.kill(rank, no_restart=True)
        ray.util.remove_placement_group(self.placement)


class PlacementError(RuntimeError):
    """A group's ranks could not all be placed; `placeable` says how many could be now."""

    def __init__(self, message: str, placeable: int):
        super().__init__(message)
        self.placeable = placeable


def _bundle(res: ResourcesConfig) -> dict[str, float]:
    # A bundle must ask for something; a sliver of CPU stands in when no resources are reserved.
    return {"CPU": max(res.num_cpus, 0.01), **({"GPU": res.num_gpus} if res.num_gpus else {}), **res.custom}


def placeable_ranks(res: ResourcesConfig) -> int:
    """How many ranks with `res` each alive node could take now, summed over the nodes."""
    total = 0
    for available in _available_per_node():
        total += min(int(available.get(name, 0.0) / need + 1e-9) for name, need in _bundle(res).items())
    return total


def _available_per_node() -> list[dict[str, float]]:
    # Ray's public API gives free resources per cluster and totals per node; a rank needs its
    # whole bundle on one node, so this reads the per-node free resources the autoscaler uses.
    from ray._private.state import available_resources_per_node

    return list(available_resources_per_node().values())


def _place(res: ResourcesConfig, world_size: int, section: str, timeout_s: float = PLACEMENT_TIMEOUT_S):
    bundle = _bundle(res)
    group = placement_group([dict(bundle) for _ in range(world_size)], strategy="PACK")
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(group)
        raise PlacementError(
            f"{section}: {world_size} ranks x {bundle} could not be placed in {timeout_s:g}s "
            f"({section}.resources asks for more than the cluster has; try `--dry-run`)",
            placeable_ranks(res),
        ) from None
    return group


def _rank_options(res: ResourcesConfig, group, rank: int) -> dict:
    return {
        "num_cpus": res.num_cpus,
        "num_gpus": res.num_gpus,
        "resources": dict(res.custom),
        "scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank),
    }
