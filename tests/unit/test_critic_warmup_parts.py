"""The critic warm-up's pure parts (`critic.freeze_policy_steps`, veRL's `trainer.critic_warmup`):
the field and its refusal, which steps hold the policy, the policy's LR schedule span, a held
step's policy metrics from the batch, what a held step's stats are not read as (the KL controller,
the `kl_above` rollback, the bad-steps count), and the warm-up's log lines. Its real run on rank
actors: tests/integration/test_critic_warmup_ranks.py; a checkpoint inside it on a real learner:
tests/unit/test_critic_warmup_checkpoint.py."""

from __future__ import annotations

import pytest
import torch

from actors.reporting import Reporter
from actors.trainer import policy_held_steps, policy_rank_settings, warm_up_line
from rlhf_cluster.config import ConfigError, GuardrailsConfig, JobConfig, RollbackConfig, load_config
from rlhf_cluster.experience.records import ScoredSample, TrainBatch
from rlhf_cluster.job.guardrails import EvalGuard, RollbackGuard, policy_held
from rlhf_cluster.learner.step_metrics import held_policy_metrics
from rlhf_cluster.run.run_dir import RunDir

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


HELD = {"policy/updated": 0.0, "policy/kl": 0.5, "learner/step_seconds": 0.0}


def test_a_held_steps_kl_is_not_read_as_the_policys():
    # The driver observes the KL controller only where the policy is not held; a job without a
    # critic reports no `policy/updated` and every step is the policy's.
    assert policy_held(HELD)
    assert not policy_held({**HELD, "policy/updated": 1.0}) and not policy_held({"policy/kl": 0.5})
    rollback = RollbackGuard(RollbackConfig(kl_above=0.1, response_length_above=100), "eval_accuracy", True)
    guard = EvalGuard(GuardrailsConfig())
    row = {"step": 1, "kl": 0.5, "response_len_mean": 40.0, "policy/updated": 0.0}
    assert rollback.tripped(row, guard, None) is None
    assert rollback.tripped({**row, "policy/updated": 1.0}, guard, None) == (
        "guardrails.rollback.kl_above=0.1: kl = 0.5 at step 1"
    )
    # The other conditions still read a held step's row.
    assert rollback.tripped({**row, "response_len_mean": 180.0}, guard, None).startswith(
        "guardrails.rollback.response_length_above=100"
    )


def test_a_held_step_leaves_the_consecutive_bad_steps_count(tmp_path):
    cfg = JobConfig.model_validate({"run_dir": str(tmp_path), "faults": {"max_bad_steps": 2}})
    reporter = Reporter(cfg, RunDir(tmp_path, tmp_path / "weights", tmp_path / "checkpoints"))
    skipped = {"learner/skipped_updates": 1.0, "policy/updated": 1.0}
    reporter._check_bad_step(0, skipped)
    reporter._check_bad_step(1, HELD)  # skipped no update, and made none: the count stays at 1
    assert reporter.bad_steps == 1
    with pytest.raises(RuntimeError, match="2 consecutive steps"):
        reporter._check_bad_step(2, skipped)
    reporter.bad_steps = 1
    reporter._check_bad_step(3, {"learner/skipped_updates": 0.0, "policy/updated": 1.0})
    assert reporter.bad_steps == 0  # a trained step still ends the run of bad ones
    # Found in review: a critic that skips its updates (NaN) through the warm-up was never counted.
    reporter._check_bad_step(4, {**HELD, "critic/skipped_updates": 1.0})
    assert reporter.bad_steps == 1
    with pytest.raises(RuntimeError, match="2 consecutive steps"):
        reporter._check_bad_step(5, {"learner/skipped_updates": 0.0, "critic/skipped_updates": 2.0})


def test_a_run_starting_inside_the_warm_up_says_so():
    assert warm_up_line(0, 3, first=True) == (
        "critic warm-up: steps 0..2 train the critic alone, 3 in all (critic.freeze_policy_steps)"
    )
    # Resumed (or rolled back) into the warm-up: its first step logs what is left of it.
    assert warm_up_line(2, 3, first=True) == (
        "critic warm-up: steps 2..2 train the critic alone (from step 2), 3 in all (critic.freeze_policy_steps)"
    )
    assert warm_up_line(1, 3, first=False) is None and warm_up_line(4, 3, first=True) is None
    assert warm_up_line(0, 0, first=True) is None
    done = "step 3: critic warm-up done (3 steps); the policy trains from this step on"
    assert warm_up_line(3, 3, first=False) == warm_up_line(3, 3, first=True) == done
