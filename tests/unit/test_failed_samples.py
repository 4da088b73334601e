"""A sample that failed before it could be scored (`Rollout.failure`: its agent raised, hung or
died) is never sent to the scorers, gets a failed reward, and its group is built over the rest
when enough remain, else kept whole (and dropped by the job state) (`actors.rollout`)."""

from __future__ import annotations

import asyncio

from actors.rollout import rollout
from rlhf_cluster.config import JobConfig
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.experience.build import FixedKLController
from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.run.job_state import reward_failed


def _rollouts(failed: set[int]) -> list[Rollout]:
    return [
        Rollout(sample_id=f"g:{k}", prompt_id="p", group_id="g", prompt_ids=[1, 2],
                response_ids=[] if k in failed else [3, 4, 5], rollout_logprobs=[] if k in failed else [-1.0] * 3,
                policy_version=0, finish_reason="stop", worker="gen0", failure="agent died" if k in failed else "")
        for k in range(4)
    ]


class Scorers:
    """The cluster's generation call and its scoring calls (canned), recording what was scored."""

    def __init__(self, rollouts: list[Rollout]):
        self.rollouts, self.scored, self.referenced = rollouts, [], []
        self.scoring = self  # the cluster's `ScoringCalls`

    async def call(self, pool, method, *args):
        return "gen0", self.rollouts

    async def rewards(self, rollouts, answers):
        self.scored += [r.sample_id for r in rollouts]
        return [(float(r.sample_id[-1]), {}) for r in rollouts]

    async def judge(self, rollouts, prompts, answers):
        return None  # the job has no judge

    async def reference_logprobs(self, rollouts):
        self.referenced += [r.sample_id for r in rollouts]
        return [[-1.1] * len(r.response_ids) for r in rollouts]

    async def teacher_logprobs(self, rollouts):
        return None  # the job does not distill


def _run(failed: set[int]):
    cfg = JobConfig.model_validate({"generation": {"sampling": {"n": 4}}})
    scorers = Scorers(_rollouts(failed))
    groups = asyncio.run(rollout(cfg, scorers, [Prompt("p", "1+1", "2")], 0, FixedKLController(0.0)))
    return scorers, groups


def test_a_failed_sample_is_not_scored_and_its_group_keeps_the_rest():
    scorers, (group,) = _run({1})
    assert scorers.scored == scorers.referenced == ["g:0", "g:2", "g:3"]
    assert [s.sample_id for s in group.samples] == ["g:0", "g:2", "g:3"] and group.failed == 1
    assert not any(reward_failed(s.reward, s.reward_components) for s in group.samples)


def test_a_group_with_too_few_samples_left_is_kept_whole_to_be_dropped():
    scorers, (group,) = _run({0, 1, 2})
    assert scorers.scored == ["g:3"]
    assert len(group.samples) == 4 and sum(reward_failed(s.reward, s.reward_components) for s in group.samples) == 3
    _, (whole,) = _run({0, 1, 2, 3})  # nothing to score at all
    assert all(reward_failed(s.reward, s.reward_components) for s in whole.samples)
