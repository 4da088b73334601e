"""The critic warm-up's pure parts (`critic.freeze_policy_steps`, veRL's `trainer.critic_warmup`):
the field and its refusal, which steps hold the policy, the policy's LR schedule span, and a held
step's policy metrics from the batch. Its real run on rank actors: tests/integration/test_critic_warmup_ranks.py."""

from __future__ import annotations

import pytest
import torch

from actors.trainer import policy_held_steps, policy_rank_settings
from rlhf_cluster.config import ConfigError, load_config
from rlhf_cluster.experience.records import ScoredSample, TrainBatch
from rlhf_cluster.learner.step_metrics import held_policy_metrics

PPO = ["algorithm.advantage=gae", "critic.init=policy", "train.total_steps=10"]


def test_the_field_defaults_to_no_warm_up_and_refuses_a_negative_count():
    assert load_config(None, PPO).critic.freeze_policy_steps == 0
    with pytest.raises(ConfigError, match="critic.freeze_policy_steps"):
        load_config(None, [*PPO, "critic.freeze_policy_steps=-1"])


def test_a_warm_up_as_long_as_the_job_is_refused_naming_both_fields():
    for held in (10, 11):
        with pytest.raises(ConfigError, match=r"critic.freeze_policy_steps=\d+ >= train.total_steps=10"):
            load_config(None, [*PPO, f"critic.freeze_policy_steps={held}"])
    assert load_config(None, [*PPO, "critic.freeze_policy_steps=9"]).critic.freeze_policy_steps == 9


def test_the_old_name_stays_the_critics_lr_warm_up_refused():
    # `critic.warmup_steps` was renamed to critic.lr_warmup_steps: it must not silently become the critic warm-up.
    with pytest.raises(ConfigError, match="critic.warmup_steps was renamed to critic.lr_warmup_steps"):
        load_config(None, [*PPO, "critic.warmup_steps=2"])


def test_only_a_trained_critic_holds_the_policy():
    assert policy_held_steps(load_config(None, [*PPO, "critic.freeze_policy_steps=3"])) == 3
    # A critic section without gae starts no critic (preflight warns): nothing holds the policy.
    grpo = load_config(None, ["algorithm.advantage=grpo", "critic.freeze_policy_steps=3", "train.total_steps=10"])
    assert policy_held_steps(grpo) == 0
    assert policy_held_steps(load_config(None, PPO)) == 0


def test_the_policy_lr_schedule_spans_its_own_updates():
    sched = ["learner.lr_schedule=cosine", "learner.min_lr_ratio=0.1", "learner.lr_warmup_steps=2"]
    cfg = load_config(None, [*PPO, *sched, "critic.freeze_policy_steps=4"])
    settings = policy_rank_settings(cfg)
    spec = settings.spec
    # 6 policy updates (job steps 4..9): the warm-up starts at the first, the decay ends at the last.
    assert spec.total_steps == 6
    assert spec.lr_factor(0) == pytest.approx(0.5)
    assert spec.lr_factor(5) == pytest.approx(0.1)
    # When versions are also persisted still counts the job's steps.
    assert settings.total_steps == 10
    plain = policy_rank_settings(load_config(None, [*PPO, *sched]))
    assert plain.spec.total_steps == 10


def _sample(i: int, rollout: list[float], ref: list[float]) -> ScoredSample:
    n = len(rollout)
    return ScoredSample(
        sample_id=f"s{i}", prompt_id=f"p{i}", group_id=f"g{i}", prompt_ids=[3, 4], response_ids=[5] * n,
        rollout_logprobs=rollout, policy_version=0, finish_reason="stop", reward=0.0, reward_components={},
        ref_logprobs=ref, advantages=[0.0] * n,
    )


def _k3(logp: float, ref: float) -> float:
    log_r = ref - logp
    return float(torch.tensor(log_r).exp() - 1 - log_r)


def test_a_held_steps_kl_is_the_rollouts_k3_token_mean_over_the_tokens_in_the_loss(gloo_group):
    a = _sample(0, [-1.0, -2.0], [-1.5, -1.0])
    dropped = _sample(1, [-3.0], [-0.1])  # out of the loss (overlong filter): not counted
    b = _sample(2, [-0.5, -0.5, -0.5], [-0.5, -0.7, -0.2])
    share = TrainBatch.from_samples([a, dropped, b], in_loss=[True, False, True])
    metrics = held_policy_metrics(share, torch.device("cpu"))  # one rank: its sums are the all-reduced ones
    pairs = [(-1.0, -1.5), (-2.0, -1.0), (-0.5, -0.5), (-0.5, -0.7), (-0.5, -0.2)]
    assert metrics["policy/kl"] == pytest.approx(sum(_k3(p, r) for p, r in pairs) / 5)
    assert metrics["learner/step_seconds"] == 0.0
