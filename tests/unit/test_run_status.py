"""`rlhf-cluster status RUN_DIR`: a run directory's files read back as the operator's summary."""

from __future__ import annotations

import json

import pytest
import yaml

from rlhf_cluster.config import JobConfig
from rlhf_cluster.run.status import describe_run


def _run(tmp_path, events: list[dict], scores: dict[int, float | None]):
    cfg = JobConfig.model_validate({"name": "guarded", "run_dir": str(tmp_path / "run"), "train": {"total_steps": 10},
                                    "guardrails": {"keep_best": 1, "patience": 2}})
    root = tmp_path / "run"
    root.mkdir()
    (root / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    (root / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "weight_version": i + 1, "reward_mean": 0.1 * i}) + "\n"
                                                for i in range(6)))
    (root / "eval.json").write_text(json.dumps({"prompts": 30, "accuracy_before": 0.3, "accuracy_after": 0.5,
                                                "sampled_accuracy_before": 0.2, "sampled_accuracy_after": 0.4}))
    (root / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    for step, score in scores.items():
        ckpt = cfg.checkpoint_dir / f"step-{step:08d}"
        ckpt.mkdir(parents=True)
        manifest = {"step": step} | ({"guard": {"metric": "eval_accuracy", "value": score}} if score is not None else {})
        (ckpt / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_a_guarded_run_shows_its_progress_checkpoints_and_every_action(tmp_path):
    events = [
        {"step": 1, "event": "guardrails", "actions": ["best"], "metric": "eval_accuracy", "value": 0.6, "reason": None},
        {"step": 1, "event": "guardrails", "actions": ["rollback"], "at_step": 3, "reason": "guardrails.rollback.kl_above=1: kl = 4.2",
         "lr": 5e-5, "kl_coef": 0.02},
        {"step": 5, "event": "guardrails", "actions": ["stop"], "metric": "eval_accuracy", "value": 0.5,
         "reason": "guardrails.patience: eval_accuracy did not improve"},
    ]
    lines = describe_run(_run(tmp_path, events, {1: 0.6, 5: 0.5}))
    text = "\n".join(lines)
    assert lines[0].startswith("run: guarded (")
    assert "state: finished early at step 5 (guardrails.patience: eval_accuracy did not improve)" in lines
    assert "steps: 6 of 10 (last: step 5, weight version 6, reward +0.500)" in text
    assert "greedy 0.300 -> 0.500, sampled 0.200 -> 0.400 (30 prompts)" in text
    assert "checkpoints: 2 kept, newest step-00000005; best by eval_accuracy: step-00000001 (0.600)" in text
    assert lines[-4:] == [
        "guardrail actions: 3",
        "  step 1: best checkpoint kept (eval_accuracy = 0.600)",
        "  step 3: rolled back (guardrails.rollback.kl_above=1: kl = 4.2); continued after step 1 with learner.lr 5e-05, "
        "algorithm.kl.coef 0.02",
        "  step 5: early stop (guardrails.patience: eval_accuracy did not improve)",
    ]


def test_a_run_without_actions_says_so_and_a_folder_without_a_run_is_named(tmp_path):
    lines = describe_run(_run(tmp_path, [], {4: None}))
    assert "checkpoints: 1 kept, newest step-00000004" in lines and lines[-1] == "guardrail actions: none"
    with pytest.raises(FileNotFoundError, match=r"config.yaml: not found \(is .* the run directory of a job\?\)"):
        describe_run(tmp_path)


def test_a_run_whose_last_event_is_a_failure_is_shown_failed_until_a_later_start(tmp_path):
    failed = {"event": "failed", "time": 2.0, "error": "RewardFunctionError: reward function f failed on prompt 'p'"}
    started = {"event": "pools_started", "time": 1.0, "sizes": {"generation": 1}, "auto": [], "spares": {}}
    lines = describe_run(_run(tmp_path, [started, failed], {}))
    assert lines[1] == "state: failed (RewardFunctionError: reward function f failed on prompt 'p')"
    restarted = {**started, "time": 3.0}  # a later start (or resume) writes rows after the failure
    (tmp_path / "run" / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in (started, failed, restarted)))
    assert describe_run(tmp_path / "run")[1] == "state: not running"


def test_a_run_whose_reward_says_no_answer_right_shows_its_held_out_reward(tmp_path):
    """Trial 23a B3: a reward function returning a number measures no accuracy; eval.json holds the
    held-out reward, which status shows in its place."""
    root = _run(tmp_path, [], {})
    (root / "eval.json").write_text(json.dumps({"prompts": 8, "accuracy_before": None, "accuracy_after": None,
                                                "reward_before": 0.25, "reward_after": 0.75,
                                                "sampled_reward_before": 0.2, "sampled_reward_after": 0.7}))  # fmt: skip
    lines = describe_run(root)
    assert "held-out reward: greedy 0.250 -> 0.750, sampled 0.200 -> 0.700 (8 prompts)" in lines
    assert not any(line.startswith("held-out accuracy") for line in lines)


def test_a_run_that_failed_before_it_wrote_its_config_shows_its_failure(tmp_path):
    """Trial 23a M1: a job that failed at its start after the run directory was opened and before it
    wrote its config (the supervised warm-up failing, say) left events.jsonl's `failed` row and no
    config.yaml; status called it no run."""
    root = tmp_path / "run"
    root.mkdir()
    (root / "events.jsonl").write_text(json.dumps({"event": "failed", "error": "RuntimeError: the warm-up failed"}) + "\n")
    assert describe_run(root) == [
        f"run: {root} (no config.yaml: the job ended before it wrote one)",
        "state: failed (RuntimeError: the warm-up failed)",
    ]


def test_a_run_that_trained_every_step_is_finished_and_one_cut_short_is_not_running(tmp_path):
    """Trial 23a M7: a finished run said `state: not running`, as a stopped or killed one does."""
    root = _run(tmp_path, [], {})
    assert "state: not running" in describe_run(root)  # 6 of its 10 steps
    (root / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "weight_version": i + 1}) + "\n" for i in range(10)))
    assert "state: finished (10 steps)" in describe_run(root)
