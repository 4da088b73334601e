"""ActorPool: a set of same-kind actors with round-robin dispatch."""

from __future__ import annotations

import itertools
from typing import Any, Callable

import ray

from rlhf_cluster.config import ResourcesConfig


def actor_options(res: ResourcesConfig) -> dict[str, Any]:
    """Ray options for one actor of a pool from its resources config."""
    opts: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if res.custom:
        opts["resources"] = dict(res.custom)
    return opts


class ActorPool:
    """Starts `replicas` actors with `factory(index)` and hands them out round-robin."""

    def __init__(self, name: str, factory: Callable[[int], Any], replicas: int):
        self.name = name
        self.actors = [factory(i) for i in range(replicas)]
        self._cycle = itertools.cycle(range(replicas))

    def next(self):
        return self.actors[next(self._cycle)]

    def __len__(self) -> int:
        return len(self.actors)

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
