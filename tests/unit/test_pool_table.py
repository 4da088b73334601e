"""The job's pools as a table (`actors/workers/pool_table.py`), the scoring calls over them
(`actors/workers/scoring_calls.py`) and the worker base every pool worker derives from."""

from __future__ import annotations

import asyncio

import pytest

from actors.workers.critic import CriticRank
from actors.workers.judge import JudgeWorker
from actors.workers.learner import LearnerRank
from actors.workers.pool_table import pool_rows
from actors.workers.scoring import ReferenceWorker, RewardWorker, TeacherWorker
from actors.workers.scoring_calls import ScoringCalls
from rlhf_cluster.config import load_config

ENGINES = {"full": "/policy", "int8": "/policy-int8"}


def _rows(tmp_path, *overrides: str):
    return {row.name: row for row in pool_rows(load_config(None, list(overrides)), "/policy", ENGINES, tmp_path)}


def test_a_plain_job_runs_generation_reward_and_reference(tmp_path):
    rows = _rows(tmp_path, "generation.replicas=2", "generation.quantization=[none, int8]", "scoring.reward_replicas=3")
    assert list(rows) == ["generation", "reward", "reference"]
    gen, reward, ref = rows["generation"], rows["reward"], rows["reference"]
    assert (gen.replicas, reward.replicas, ref.replicas) == (2, 3, 1)
    assert [gen.model_path(slot) for slot in (0, 1)] == ["/policy", "/policy-int8"]  # per replica slot
    assert gen.takes_weights and not reward.takes_weights and gen.joined is None
    assert (ref.worker, ref.prefix, ref.model_path(0)) == (ReferenceWorker, "ref", "/policy")
    assert reward.model_path(0) is None
    assert reward.joined == ref.joined == load_config().samples_per_step
    assert reward.settings().scoring.reward_replicas == 3  # each worker gets its section of this job


def test_distillations_teacher_is_a_pool_of_its_own_name(tmp_path):
    rows = _rows(tmp_path, "algorithm.kl.coef=0", "algorithm.distillation={teacher: /teacher}",
                 "scoring.reference_replicas=2")
    assert list(rows) == ["generation", "reward", "teacher"]
    teacher = rows["teacher"]
    assert (teacher.worker, teacher.prefix, teacher.replicas, teacher.model_path(0)) == (TeacherWorker, "teacher", 2,
                                                                                         "/teacher")


def test_lora_runs_no_reference_and_a_judge_is_one_more_row(tmp_path):
    assert list(_rows(tmp_path, "learner.lora={rank: 8}", "algorithm.kl.placement=loss")) == ["generation", "reward"]
    rows = _rows(tmp_path, "scoring.judge_replicas=2",
                 "scoring.rewards=[{type: verifier, weight: 0}, {type: judge, model: /judge}]")
    judge = rows["judge"]
    assert (judge.worker, judge.replicas, judge.model_path(0)) == (JudgeWorker, 2, "/judge")


def test_a_spares_kind_check_hands_no_reference_folder_out(tmp_path):
    """Review 21a R4: the pool's spare matching asked the reference row's `model_path`, which records
    a hand-out (`ReferenceRefresh.model_path`: kept through refreshes for a starting worker), so
    every kind check kept the current folder longer. The reference pool is one kind; generation's
    slots are still told apart by the folder they load."""
    handed_out = []
    cfg = load_config(None, ["generation.replicas=2", "generation.quantization=[none, int8]"])
    rows = {r.name: r for r in pool_rows(cfg, "/policy", ENGINES, tmp_path, lambda slot: handed_out.append(slot))}
    ref, gen = rows["reference"], rows["generation"]
    assert ref.kind_of(0) == ref.kind_of(3) and handed_out == []
    ref.model_path(0)  # a worker that starts does record it
    assert handed_out == [0]
    assert [gen.kind_of(slot) for slot in (0, 1)] == ["/policy", "/policy-int8"]


class FakePool:
    """An ActorPool's `call` with `workers` workers, each answering after the test releases it."""

    def __init__(self, workers: int = 1):
        self.workers, self.calls, self.release = workers, [], asyncio.Event()

    def __len__(self) -> int:
        return self.workers

    async def call(self, method, *args):
        self.calls.append((method, args))
        await self.release.wait()
        if method == "score":
            rollouts, _ = args
            return "w0", [(1.0, {}) for _ in rollouts]
        return "w0", [f"{method}:{item}" for item in args[0]]


def test_scoring_calls_join_what_waits_for_a_busy_pool_and_answer_none_without_one():
    async def run():
        teacher, judge = FakePool(), FakePool()
        calls = ScoringCalls({"teacher": teacher, "judge": judge}, {"teacher": 4, "judge": None})
        assert await calls.reference_logprobs(["a"]) is None  # no reference pool: the teacher serves
        first = asyncio.create_task(calls.teacher_logprobs(["a"]))
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(calls.teacher_logprobs([x])) for x in ("b", "c")]
        alone = [asyncio.create_task(calls.judge([], {}, {})) for _ in range(2)]  # not joined: each call alone
        await asyncio.sleep(0.01)
        teacher.release.set()
        judge.release.set()
        got = await asyncio.gather(first, *waiting, *alone)
        assert got[:3] == [["logprobs:a"], ["logprobs:b"], ["logprobs:c"]]
        assert [args[0] for _, args in teacher.calls] == [["a"], ["b", "c"]]  # b and c waited, then left together
        assert len(judge.calls) == 2
        # The joined pool's queue (b and c waited ~0.01 s); a pool whose calls go alone has none.
        queues = calls.queue_depths()
        assert set(queues) == {"queue_teacher"} and queues["queue_teacher"] > 0
        assert calls.queue_depths()["queue_teacher"] == 0.0  # nothing waited since
        with pytest.raises(RuntimeError, match="no reward pool"):
            await calls.rewards([], {})

    asyncio.run(run())


@pytest.mark.parametrize("worker", [RewardWorker, ReferenceWorker, TeacherWorker, JudgeWorker, LearnerRank, CriticRank])
def test_every_worker_answers_its_inherited_heartbeat_on_its_own_thread(worker):
    # What Ray read off the class it decorated: the base's `heartbeat` runs in the `health` group.
    methods = worker.__ray_metadata__.method_meta
    assert methods.concurrency_group_for_methods.get("heartbeat") == "health"
    assert {"info", "heartbeat"} <= set(methods.methods)


def test_spares_are_each_rows_own(tmp_path):
    rows = _rows(tmp_path, "generation.spares=2", "scoring.spares=1")
    assert {name: row.spares for name, row in rows.items()} == {"generation": 2, "reward": 1, "reference": 1}
    assert {row.spares for row in _rows(tmp_path).values()} == {0}
