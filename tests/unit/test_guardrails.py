"""Guardrails' bookkeeping (rlhf_cluster/job/guardrails.py): verdicts on a run's evaluations, replay on
resume, best-k retention of checkpoints, and config errors that name the field."""

from __future__ import annotations

import pytest

from rlhf_cluster.run.checkpoint import CheckpointStore, best_checkpoints
from rlhf_cluster.config import ConfigError, GuardrailsConfig, JobConfig
from rlhf_cluster.job.guardrails import EvalGuard
from rlhf_cluster.job.override import JobOverride
from rlhf_cluster.job.preflight import preflight


def _verdicts(cfg: GuardrailsConfig, values: list[float]):
    guard = EvalGuard(cfg)
    return [guard.observe(step, {cfg.metric: v}) for step, v in enumerate(values)]


def test_patience_counts_evaluations_without_improvement_by_more_than_min_delta():
    cfg = GuardrailsConfig(patience=2, min_delta=0.05)
    verdicts = _verdicts(cfg, [0.2, 0.5, 0.52, 0.6, 0.58, 0.61])
    assert [v.improved for v in verdicts] == [True, True, False, True, False, False]
    assert [v.stop is not None for v in verdicts] == [False] * 5 + [True]
    assert verdicts[-1].stop == ("guardrails.patience: eval_accuracy has not improved on 0.6 (step 3) for 2 evaluations")


def test_a_target_stops_and_lower_can_be_better():
    assert _verdicts(GuardrailsConfig(target=0.5), [0.1, 0.5])[1].stop.startswith("guardrails.target: eval_accuracy = 0.5")
    lower = GuardrailsConfig(metric="eval_reward_mean", higher_is_better=False, target=-1.0)
    verdicts = _verdicts(lower, [0.0, -0.5, -0.2, -1.0])
    assert [v.improved for v in verdicts] == [True, True, False, True] and verdicts[-1].stop is not None


def test_a_step_without_the_metric_is_no_evaluation_and_replay_rebuilds_the_state():
    cfg = GuardrailsConfig(patience=3)
    guard = EvalGuard(cfg)
    assert guard.observe(0, {"reward_mean": 1.0}) is None
    rows = [{"step": 0, "eval_accuracy": 0.4}, {"step": 1}, {"step": 2, "eval_accuracy": 0.3}]
    guard.replay(rows)
    assert (guard.best, guard.best_step, guard.since_best) == (0.4, 0, 1)


def test_best_k_retention_keeps_the_newest_and_the_best_scored(tmp_path):
    store = CheckpointStore(tmp_path, keep=1, keep_best=2)
    for step, score in ((0, 0.3), (1, None), (2, 0.7), (3, 0.5), (4, 0.1)):
        tmp = store.begin(step)
        (tmp / "learner" / "x").write_text("w")
        store.finalize(tmp, step, step + 1, {} if score is None else {"guard": {"metric": "m", "value": score}})
    assert [p.name for p in store.list()] == ["step-00000002", "step-00000003", "step-00000004"]
    assert best_checkpoints({0: 0.5, 1: 0.5, 2: 0.1}, 1, higher_is_better=True) == {0}
    assert best_checkpoints({0: 0.5, 1: 0.5, 2: 0.1}, 1, higher_is_better=False) == {2}


def test_guardrails_need_the_periodic_evaluation_and_a_metric_it_reports():
    with pytest.raises(ConfigError, match="guardrails: keep_best / patience / target / rollback.eval_drop act on the periodic evaluation"):
        preflight(JobConfig.model_validate({"guardrails": {"patience": 2}}))
    on = {"data": {"eval_every_steps": 2}}
    with pytest.raises(ConfigError, match="guardrails.metric='accuracy': not an evaluation column"):
        preflight(JobConfig.model_validate({**on, "guardrails": {"keep_best": 1, "metric": "accuracy"}}))
    with pytest.raises(ConfigError, match=r"k=3 is not in data.eval_pass_k=\[1, 4\]"):
        preflight(JobConfig.model_validate({**on, "guardrails": {"keep_best": 1, "metric": "eval_pass@3"}}))
    with pytest.raises(ConfigError, match="data.columns.source names no column"):
        preflight(JobConfig.model_validate({**on, "guardrails": {"keep_best": 1, "metric": "eval_accuracy/easy"}}))
    preflight(JobConfig.model_validate({**on, "guardrails": {"keep_best": 1, "metric": "eval_pass@4"}}))


def test_a_per_file_accuracy_is_a_metric_when_held_out_prompts_come_from_several_files():
    """Several prompt files give each held-out prompt its file's label as source (prompt_files.py)."""
    from rlhf_cluster.config import DataConfig
    from rlhf_cluster.job.guardrails import metric_problem

    metric = "eval_accuracy/b"
    assert metric_problem(metric, DataConfig(path="a.parquet", eval_fraction=0.1)) is not None
    assert metric_problem(metric, DataConfig(path=["a.parquet", "b.parquet"], eval_fraction=0.1)) is None
    assert metric_problem("eval_accuracy/d", DataConfig(path="a.parquet", eval_path=["c.parquet", "d.parquet"])) is None
    assert metric_problem(metric, DataConfig(path=["a.parquet", "b.parquet"], eval_path="c.parquet")) is not None
    # A label no file has would never be reported, so the guard would never act (review): refused, naming them.
    assert "labels ['a', 'b']" in metric_problem("eval_accuracy/gsm8k", DataConfig(path=["a.parquet", "b.parquet"],
                                                                                  eval_fraction=0.1))


def test_rollback_conditions_name_the_bound_and_the_value_and_adjust_the_settings():
    from rlhf_cluster.config import RollbackConfig
    from rlhf_cluster.job.guardrails import RollbackGuard

    rollback = RollbackGuard(RollbackConfig(entropy_below=0.1, response_length_above=100, eval_drop=0.2,
                                            max_rollbacks=1, lr_factor=0.25), "eval_accuracy", True)
    guard = EvalGuard(GuardrailsConfig())
    assert rollback.tripped({"step": 3, "policy/entropy": 0.5, "response_len_mean": 40}, guard, None) is None
    assert rollback.tripped({"step": 3, "policy/entropy": 0.05}, guard, None) == \
        "guardrails.rollback.entropy_below=0.1: policy/entropy = 0.05 at step 3"
    assert rollback.tripped({"step": 4, "response_len_mean": 180.0}, guard, None).startswith(
        "guardrails.rollback.response_length_above=100: response_len_mean = 180")
    guard.observe(2, {"eval_accuracy": 0.6})
    drop = guard.observe(5, {"eval_accuracy": 0.3})
    reason = rollback.tripped({"step": 5}, guard, drop)
    assert reason.startswith("guardrails.rollback.eval_drop=0.2: eval_accuracy = 0.3 at step 5, 0.3 below the best 0.6")
    assert rollback.last_good_step(5, reason) == 4 and rollback.last_good_step(5, "guardrails.rollback.kl_above=1") == 3
    cfg = JobConfig.model_validate({"learner": {"lr": 1e-4}, "algorithm": {"kl": {"coef": 0.01}}})
    shrunk = JobOverride(learner_world_size=1)  # an elastic shrink before the rollback is kept
    override = rollback.adjusted(shrunk, cfg, reason)
    adjusted = override.apply(cfg)
    assert adjusted.learner.lr == pytest.approx(2.5e-5) and adjusted.algorithm.kl.coef == pytest.approx(0.02)
    assert adjusted.learner.world_size == 1 and (override.lr, override.kl_coef) == (adjusted.learner.lr, 0.02)
    assert cfg.learner.lr == 1e-4 and cfg.algorithm.kl.coef == 0.01  # the job's config is never changed
    with pytest.raises(RuntimeError, match="eval_drop=0.2.*giving up: the 1 rollbacks allowed"):
        rollback.adjusted(override, cfg, reason)


def test_the_rollbacks_a_resumed_run_made_before_count_against_max_rollbacks(tmp_path):
    """Issue 58: the count starts from the run's kept events.jsonl rows on resume, not at 0 (a job
    that rolls back, is killed and resumes could otherwise roll back max_rollbacks times per resume)."""
    from rlhf_cluster.config import RollbackConfig
    from rlhf_cluster.job.guardrails import RollbackGuard
    from rlhf_cluster.run.run_dir import RunDir

    run = RunDir(tmp_path / "run", tmp_path / "weights", tmp_path / "ckpt")
    run.root.mkdir(parents=True, exist_ok=True)
    run.append(RunDir.EVENTS, [
        {"step": 3, "event": "guardrails", "actions": ["rollback"], "at_step": 6, "reason": "kl_above"},
        {"step": 7, "event": "guardrails", "actions": ["keep_best"]},
        {"step": 5, "event": "guardrails", "actions": ["rollback"], "at_step": 9, "reason": "kl_above"},
    ])
    rollback = RollbackGuard(RollbackConfig(kl_above=1.0, max_rollbacks=3), "eval_accuracy", True)
    job = JobConfig.model_validate({"learner": {"lr": 1e-4}, "algorithm": {"kl": {"coef": 0.01}}})
    override = rollback.replay(run.read(RunDir.EVENTS), job)
    assert rollback.rollbacks == 2
    # ...and the run goes on with their settings (lr x 0.5, kl x 2 each, the defaults), not the job's.
    cfg = override.apply(job)
    assert cfg.learner.lr == pytest.approx(1e-4 * 0.5**2) and cfg.algorithm.kl.coef == pytest.approx(0.01 * 2**2)
    assert job.learner.lr == 1e-4  # the job's config is never changed
    none = rollback.replay([], job)
    assert none == JobOverride() and none.apply(job) is job and rollback.rollbacks == 0  # no rollback kept
    rollback.replay(run.read(RunDir.EVENTS), job)
    override = rollback.adjusted(override, job, "guardrails.rollback.kl_above=1")  # the third
    assert override.apply(job).learner.lr == pytest.approx(1e-4 * 0.5**3)
    with pytest.raises(RuntimeError, match="the 3 rollbacks allowed"):
        rollback.adjusted(override, job, "guardrails.rollback.kl_above=1")


def test_guardrails_on_accuracy_with_a_function_reward_are_warned_of_and_said_idle(caplog):
    """Trial 23a B3: a reward function that returns a number gives no accuracy (only a `correct`, or
    verl's `acc`, component says which answers are right): guardrails watching accuracy would do
    nothing. Preflight says so; the first evaluation without the metric says so once."""
    base = ["data.eval_every_steps=2", "guardrails.patience=2",
            "scoring.rewards=[{type: function, function: 'rlhf_cluster.rewards.controls:digit_share'}]"]  # fmt: skip
    from rlhf_cluster.config import load_config

    warned = [w for w in preflight(load_config(None, base), files=False) if "no held-out accuracy is measured" in w]
    assert len(warned) == 1 and warned[0].startswith("guardrails.metric=eval_accuracy with the reward function")
    reward_mean = load_config(None, [*base, "guardrails.metric=eval_reward_mean"])
    assert not any("no held-out accuracy is measured" in w for w in preflight(reward_mean, files=False))
    guard = EvalGuard(GuardrailsConfig(patience=1))
    with caplog.at_level("WARNING"):
        assert guard.observe(1, {"eval_reward_mean": 1.0}) is None
        assert guard.observe(3, {"eval_reward_mean": 1.0}) is None
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "guardrails.metric=eval_accuracy: the evaluation after step 1 does not report it" in caplog.records[0].message
    assert _verdicts(GuardrailsConfig(metric="eval_sampled_reward_mean", patience=1), [0.5, 0.4])[1].stop is not None
