"""On-policy distillation on real parts: the teacher's pool (`teacher`, in the reference pool's
place) serves the teacher (a tiny model of another initialisation, the same tokenizer), every
trained sample's `ref_logprobs` are the teacher's own for its tokens, and its advantages are coef x (teacher - sampling log-probs); the
learner's KL column is the KL to the teacher. Whether a student learns from a good teacher is
`benchmarks/distillation.py`'s (docs/demo-results.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.job import Job
from rlhf_cluster.config import TinyModelConfig
from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.models.tiny_model import ensure_tiny_model
from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.run.scored_log import ScoredLog
from rlhf_cluster.scoring.reference import ReferenceModel

COEF = 0.5


def test_a_students_samples_carry_the_teachers_log_probs_and_advantages(ray_cluster, job_config, model_cache):
    teacher = str(ensure_tiny_model(TinyModelConfig(seed=7), model_cache))  # random weights, the policy's tokenizer
    cfg = job_config(
        name="distill", reference=True,
        algorithm={"kl": {"coef": 0.0}, "distillation": {"teacher": teacher, "coef": COEF}},
        train={"total_steps": 2, "prompts_per_step": 2, "max_staleness": 1, "progress": False,
               "record_rollouts": True})
    with Job(cfg) as job:
        assert job.pool_sizes() == {"generation": 1, "reward": 1, "teacher": 1}  # under its own name
        assert set(job.worker_infos("teacher")) == {"teacher0"}
        result = job.run()
    assert [r["step"] for r in result.rows] == [0, 1]
    assert "busy_teacher" in result.rows[0] and "busy_reference" not in result.rows[0]
    samples = [s for _, group in ScoredLog(Path(cfg.run_dir) / RunDir.SCORED_LOG).since(0) for s in group]
    assert samples
    rollouts = [Rollout(sample_id=s.sample_id, prompt_id=s.prompt_id, group_id=s.group_id, prompt_ids=s.prompt_ids,
                        response_ids=s.response_ids, rollout_logprobs=s.rollout_logprobs,
                        policy_version=s.policy_version, finish_reason=s.finish_reason) for s in samples]
    served = ReferenceModel(teacher).logprobs(rollouts)
    for s, expected in zip(samples, served):
        assert s.ref_logprobs == pytest.approx(expected, abs=1e-4)  # the teacher's, not the initial policy's
        assert s.advantages == pytest.approx([COEF * (t - r) for t, r in zip(s.ref_logprobs, s.rollout_logprobs)],
                                             abs=1e-6)
    # The learner's KL column measures the distance to the teacher (another model: not zero).
    assert all(r["kl"] > 0 for r in result.rows)
