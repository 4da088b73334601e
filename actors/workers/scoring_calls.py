"""The scoring calls a rollout makes: rewards, the reference's or the teacher's per-token log-probs,
and the judge's verdicts, each to its pool, with the calls of groups that finish together joined
(`CallCoalescer`, as far as the pool's row says: `actors/workers/pool_table.py`)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from actors.workers.pools import ActorPool
from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.scoring.call_coalescing import CallCoalescer
from rlhf_cluster.scoring.rewards import RewardContext

Send = Callable[[list], Awaitable[Sequence[Any]]]


class ScoringCalls:
    """One object per job, beside its pools: each call goes to the least busy worker of its pool;
    while every worker of a pool is busy, the calls that wait for one leave together when one
    frees up (at most the pool's `joined` items; `joined` has no entry or None: each call alone).
    A call to a pool the job does not run answers None."""

    def __init__(self, pools: dict[str, ActorPool], joined: dict[str, int | None]):
        self.pools = pools
        self.coalescers: dict[str, CallCoalescer] = {}  # by pool, where its calls are joined
        self._queue_seen: dict[str, float] = {}  # each coalescer's item-seconds at the last queue_depths
        self._queue_at = time.monotonic()

        def joining(pool: str, send: Send) -> Send | None:
            if pool not in pools:
                return None
            most = joined.get(pool)
            if most is None:
                return send
            self.coalescers[pool] = CallCoalescer(send, lambda: len(pools[pool]), most)
            return self.coalescers[pool]

        self._rewards = joining("reward", self._send_rewards)
        self._reference = joining("reference", partial(self._send, "reference", "logprobs"))
        self._teacher = joining("teacher", partial(self._send, "teacher", "logprobs"))
        self._judge = joining("judge", partial(self._send, "judge", "judge"))

    async def rewards(
        self, rollouts: list[Rollout], contexts: dict[str, RewardContext]
    ) -> list[tuple[float, dict[str, float]]]:
        """(reward, components) per rollout, from the reward pool; `contexts`: each prompt's answer
        and what a custom reward function may take besides, by prompt id (`reward_contexts`)."""
        if self._rewards is None:
            raise RuntimeError("this job has no reward pool")
        return list(await self._rewards([(r, contexts) for r in _unrouted(rollouts)]))

    async def reference_logprobs(self, rollouts: list[Rollout]) -> list[list[float]] | None:
        """Per-token log-probs of the frozen initial policy per rollout (None: no reference pool)."""
        return None if self._reference is None else list(await self._reference(_unrouted(rollouts)))

    async def teacher_logprobs(self, rollouts: list[Rollout]) -> list[list[float]] | None:
        """Per-token log-probs of the distillation teacher per rollout (None: no teacher pool)."""
        return None if self._teacher is None else list(await self._teacher(_unrouted(rollouts)))

    async def judge(
        self, rollouts: list[Rollout], prompts: dict[str, str], answers: dict[str, str]
    ) -> list[float | None] | None:
        """The judge's reward per rollout (None for one it could not judge), or None when the job
        has no judge; a group's rollouts stay in one call (calls are joined, never split)."""
        if self._judge is None:
            return None
        return list(await self._judge([(r, prompts[r.prompt_id], answers[r.prompt_id]) for r in _unrouted(rollouts)]))

    def queue_depths(self) -> dict[str, float]:
        """`queue_<pool>`: the mean number of items (samples) that waited for a free worker of each
        pool whose calls are joined, since the previous call (a step's, called once a step)."""
        now = time.monotonic()
        seconds, self._queue_at = max(now - self._queue_at, 1e-9), now
        depths = {}
        for pool, calls in self.coalescers.items():
            total = calls.waited_item_seconds()
            depths[f"queue_{pool}"] = (total - self._queue_seen.get(pool, 0.0)) / seconds
            self._queue_seen[pool] = total
        return depths

    async def _send(self, pool: str, method: str, items: list) -> list:
        return (await self.pools[pool].call(method, items))[1]

    async def _send_rewards(self, items: list[tuple[Rollout, dict[str, RewardContext]]]) -> list:
        contexts: dict[str, RewardContext] = {}
        for held in {id(c): c for _, c in items}.values():
            contexts.update(held)
        return (await self.pools["reward"].call("score", [r for r, _ in items], contexts))[1]


def _unrouted(rollouts: list[Rollout]) -> list[Rollout]:
    """The rollouts as the scorers get them: without their routed experts (MoE policies), which
    no scorer reads and which would cross to its process with every call (MBs per long sample)."""
    return [r if getattr(r, "routed_experts", None) is None else replace(r, routed_experts=None) for r in rollouts]
