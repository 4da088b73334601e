"""On-policy distillation's pure half: each sampled token's advantage is coef x (teacher log-prob
- the student's sampling log-prob), alone or on top of the group's task advantage; and the config
rules and the tokenizer check that keep a teacher honest."""

from __future__ import annotations

import pytest

from rlhf_cluster.algorithms import distillation_advantages
from rlhf_cluster.config import ConfigError, JobConfig, TinyModelConfig
from rlhf_cluster.experience.build import build_group
from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.job.preflight import preflight
from rlhf_cluster.job.teacher import tokenizer_mismatch
from rlhf_cluster.models.tiny_model import ensure_tiny_model

STUDENT = [[-1.0, -2.0, -0.5], [-3.0, -0.1]]
TEACHER = [[-0.5, -2.5, -0.5], [-1.0, -0.1]]


def test_each_token_is_pulled_toward_the_teacher_by_its_reverse_kl():
    adv, metrics = distillation_advantages(STUDENT, TEACHER, coef=2.0)
    assert adv == [[1.0, -1.0, 0.0], [4.0, 0.0]]  # up where the teacher likes the token more, down where less
    gaps = [s - t for ss, ts in zip(STUDENT, TEACHER) for s, t in zip(ss, ts)]
    assert metrics["distill/reverse_kl"] == pytest.approx(sum(gaps) / 5)
    assert metrics["distill/teacher_logprob"] == pytest.approx(sum(sum(t) for t in TEACHER) / 5)
    masked, masked_metrics = distillation_advantages(STUDENT, TEACHER, 1.0, [[1, 0, 1], None])
    assert masked[0] == [0.5, 0.0, 0.0]  # a token an environment wrote carries nothing
    assert masked_metrics["distill/reverse_kl"] == pytest.approx((-0.5 + 0.0 - 2.0 + 0.0) / 4)  # model tokens only
    with pytest.raises(ValueError, match="response 1: 2 student log-probs, 1 teacher ones"):
        distillation_advantages(STUDENT, [TEACHER[0], [-1.0]], 1.0)


def _group() -> list[Rollout]:
    return [Rollout(sample_id=f"g:{i}", prompt_id="p", group_id="g", prompt_ids=[1], response_ids=[5] * len(lp),
                    rollout_logprobs=lp, policy_version=0, finish_reason="stop") for i, lp in enumerate(STUDENT)]


@pytest.mark.parametrize("mix", [False, True])
def test_a_group_carries_the_teachers_advantages_alone_or_with_the_task_rewards(mix):
    cfg = JobConfig.model_validate({"algorithm": {"kl": {"coef": 0.0},
                                                  "distillation": {"teacher": "t", "coef": 1.0, "mix_with_rewards": mix}}})
    samples, metrics = build_group(_group(), [(1.0, {}), (0.0, {})], TEACHER, cfg.algorithm, kl_coef=0.0,
                                   max_new_tokens=8)
    distilled, _ = distillation_advantages(STUDENT, TEACHER, 1.0)
    task, _ = build_group(_group(), [(1.0, {}), (0.0, {})], TEACHER, JobConfig().algorithm, kl_coef=0.0,
                          max_new_tokens=8)
    for s, d, t in zip(samples, distilled, task):
        expected = [a + b for a, b in zip(d, t.advantages)] if mix else d
        assert s.advantages == pytest.approx(expected)
    assert metrics["distill/reverse_kl"] == pytest.approx(-0.4) and metrics["zero_signal"] == 0.0
    # Equal rewards leave no task signal, but the teacher's is still there.
    _, flat = build_group(_group(), [(1.0, {}), (1.0, {})], TEACHER, cfg.algorithm, kl_coef=0.0, max_new_tokens=8)
    assert flat["zero_signal"] == 0.0


def test_the_config_refuses_a_teacher_beside_what_would_undo_it(tmp_path, tiny_model_path):
    def refused(**sections) -> str:
        cfg = JobConfig.model_validate({"run_dir": str(tmp_path), "model": {"path": tiny_model_path},
                                        "algorithm": {"distillation": {"teacher": tiny_model_path}, **sections.pop(
                                            "algorithm", {})}, **sections})
        with pytest.raises(ConfigError) as exc:
            preflight(cfg, files=False)
        return str(exc.value)

    assert "set kl.coef: 0" in refused(algorithm={"kl": {"coef": 0.1}})
    assert "set scoring.reference: true" in refused(algorithm={"kl": {"coef": 0.0}}, scoring={"reference": False})
    assert "for grpo, dr_grpo, rloo" in refused(algorithm={"kl": {"coef": 0.0}, "advantage": "reinforce_pp"})
    assert "train without LoRA" in refused(algorithm={"kl": {"coef": 0.0}}, learner={"lora": {"rank": 4}})


def test_a_teacher_with_another_tokenizer_is_refused_naming_both(tmp_path, tiny_model_path, model_cache):
    other = str(ensure_tiny_model(TinyModelConfig(corpus="tool_arithmetic"), model_cache))  # another vocabulary
    assert tokenizer_mismatch(tiny_model_path, tiny_model_path) is None
    problem = tokenizer_mismatch(tiny_model_path, other)
    assert problem is not None and other in problem and tiny_model_path in problem
    cfg = JobConfig.model_validate({"run_dir": str(tmp_path), "model": {"path": tiny_model_path},
                                    "algorithm": {"kl": {"coef": 0.0}, "distillation": {"teacher": other}}})
    with pytest.raises(ConfigError, match="is not the policy's"):
        preflight(cfg)
