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
