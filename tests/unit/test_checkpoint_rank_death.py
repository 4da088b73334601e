"""A learner rank that dies while a checkpoint is staged (found by the soak, issue 58: the driver's
await on the ranks' digests raised and ended the job) fails that checkpoint only: its temp
directory is removed, the failure counted, the previous checkpoint stays, and the job's next call
to the learner finds the rank dead and rebuilds from it as after any rank death."""

from __future__ import annotations

import asyncio

import ray

from actors.checkpointer import Checkpointer
from actors.reporting import Reporter
from rlhf_cluster.config import JobConfig
from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.telemetry import metrics as m
from rlhf_cluster.weights import WeightStore


class _DyingTrainer:
    async def stage_checkpoint(self, tmp):
        raise ray.exceptions.ActorDiedError()


class _State:
    def save(self, step, tmp):
        (tmp / "driver.json").write_text("{}")


def test_a_rank_dying_while_a_checkpoint_is_staged_fails_that_checkpoint_not_the_job(tmp_path):
    cfg = JobConfig.model_validate({"name": "ckpt-death", "run_dir": str(tmp_path / "run")})
    run_dir = RunDir(cfg.run_dir, cfg.weights_dir, cfg.checkpoint_dir)
    run_dir.root.mkdir(parents=True)
    checkpointer = Checkpointer(cfg, run_dir, WeightStore(cfg.weights_dir, cfg.weights.keep), Reporter(cfg, run_dir))
    failures = m.CHECKPOINT_FAILURES.labels(job="ckpt-death", pool="driver", worker="driver")
    before = failures._value.get()

    async def save():
        async with asyncio.TaskGroup() as tg:
            await checkpointer.save(tg, 7, _DyingTrainer(), _State())

    asyncio.run(save())
    assert checkpointer.checkpoints.list() == [] and not list(checkpointer.checkpoints.root.glob(".*.tmp"))
    assert failures._value.get() == before + 1
