"""What `rlhf-cluster train` prints at the end, for a run that finished and one stopped (Ctrl-C)
before its final evaluation: the stopped one printed nothing but a TypeError."""

from __future__ import annotations

from actors.commands.common import print_result
from actors.reporting import JobResult


def test_a_stopped_run_prints_its_evaluation_before_and_no_after(job_config, capsys):
    cfg = job_config()
    before = {"eval_accuracy": 0.25, "eval_sampled_accuracy": 0.125}
    rows = [{"step": 0, "reward_mean": 0.5}]
    print_result(cfg, JobResult(rows=rows, evaluation_before=before, stopped=True))
    stopped = capsys.readouterr().out
    assert "before 0.250 (stopped before the last)" in stopped and "before 0.125 (stopped" in stopped
    print_result(cfg, JobResult(rows=rows, evaluation_before=before, evaluation_after={"eval_accuracy": 0.5,
                                                                                          "eval_sampled_accuracy": 0.375}))
    assert "before 0.250, after 0.500" in capsys.readouterr().out


def test_an_evaluation_without_a_figure_and_a_reward_that_says_no_answer_right(job_config, capsys):
    """Review 23a B1: a final evaluation whose every reward failed has no accuracy (a run not
    stopped): `after n/a`, not "stopped". A reward that says no answer right (trial 23a B3) prints
    the held-out reward; status reads eval.json's missing figure as n/a."""
    import json

    from rlhf_cluster.run.status import _held_out

    cfg, rows = job_config(), [{"step": 0, "reward_mean": 0.5}]
    before = {"eval_accuracy": 0.25, "eval_reward_mean": 0.4}
    print_result(cfg, JobResult(rows=rows, evaluation_before=before, evaluation_after={"eval_reward_mean": 0.0}))
    assert "held-out accuracy (greedy, verifier): before 0.250, after n/a" in capsys.readouterr().out
    rewards = {"eval_reward_mean": 0.4, "eval_sampled_reward_mean": 0.3}
    print_result(cfg, JobResult(rows=rows, evaluation_before=rewards, evaluation_after={"eval_reward_mean": 0.9,
                                                                                         "eval_sampled_reward_mean": 0.8}))
    out = capsys.readouterr().out
    assert "held-out reward (greedy): before 0.400, after 0.900" in out and "accuracy" not in out
    assert f"held-out reward ({cfg.data.eval_samples} samples per prompt): before 0.300, after 0.800" in out
    evaluation = json.loads(json.dumps({"prompts": 4, "accuracy_before": 0.25, "accuracy_after": None}))  # as read
    assert _held_out(evaluation) == ["held-out accuracy: greedy 0.250 -> n/a (4 prompts)"]
