"""Guardrails act on a live job's periodic evaluation: the first evaluation is the best so far and
its checkpoint is kept beside the newest; evaluations that do not improve end the run after
`patience` of them, checkpointed and evaluated, with each action in events.jsonl and Prometheus."""

from __future__ import annotations

import json

import pytest
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from actors.commands.cli import app
from actors.job import Job
from rlhf_cluster.run.run_dir import RunDir


def test_best_checkpoint_kept_and_patience_stops_the_run(ray_cluster, job_config):
    # min_delta 1.0: no accuracy can improve on the first by more, so the verdicts are known ahead:
    # step 0 best (checkpointed at once), steps 1 and 2 without improvement, the stop after step 2.
    cfg = job_config(
        name="guarded",
        data={"eval_prompts": 4, "eval_samples": 0, "eval_every_steps": 1},
        train={"total_steps": 8},
        checkpoint={"every_steps": 100, "keep": 1},
        guardrails={"keep_best": 1, "patience": 2, "min_delta": 1.0},
    )
    before = REGISTRY.get_sample_value("rlhf_guardrail_actions_total",
                                       {"job": "guarded", "pool": "driver", "worker": "driver", "action": "stop"}) or 0.0
    with Job(cfg) as job:
        result = job.run()
    rows = result.rows
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all("eval_accuracy" in r for r in rows)
    assert result.early_stop is not None and result.early_stop.startswith("guardrails.patience: eval_accuracy")
    assert not result.stopped and result.evaluation_after  # a finished run: the final evaluation ran

    root = RunDir(cfg.run_dir, cfg.weights_dir, cfg.checkpoint_dir)
    events = [e for e in root.read(RunDir.EVENTS) if e["event"] == "guardrails"]  # not the pools_started row
    assert [(e["step"], e["actions"]) for e in events] == [(0, ["best"]), (2, ["stop"])], events
    assert events[1]["reason"] == result.early_stop
    # The newest checkpoint (the stop's) and the best one (step 0, scored in its manifest).
    kept = sorted(p.name for p in cfg.checkpoint_dir.glob("step-*"))
    assert kept == ["step-00000000", "step-00000002"], kept
    manifest = json.loads((cfg.checkpoint_dir / "step-00000000" / "manifest.json").read_text())
    assert manifest["guard"] == {"metric": "eval_accuracy", "value": rows[0]["eval_accuracy"]}
    after = REGISTRY.get_sample_value("rlhf_guardrail_actions_total",
                                      {"job": "guarded", "pool": "driver", "worker": "driver", "action": "stop"})
    assert after == before + 1


def test_a_kl_blow_up_is_rolled_back_with_a_smaller_lr_and_the_run_recovers(ray_cluster, job_config):
    """lr 0.5 wrecks the policy in one update, so step 1's KL to the reference is far above the
    bound; the run goes back to the start (step 0's checkpoint holds the wrecked weights too) with
    lr x 1e-4 and beta x 2, and trains to the end without another rollback."""
    cfg = job_config(reference=True,
        name="rolled", learner={"lr": 0.5}, train={"total_steps": 4}, checkpoint={"every_steps": 1, "keep": 5},
        guardrails={"rollback": {"kl_above": 1.0, "lr_factor": 1e-4, "kl_coef_factor": 2.0, "max_rollbacks": 1}},
    )
    with Job(cfg) as job:
        result = job.run()
    root = RunDir(cfg.run_dir, cfg.weights_dir, cfg.checkpoint_dir)
    events = [e for e in root.read(RunDir.EVENTS) if e["event"] == "guardrails"]  # not the pools_started row
    assert [e["actions"] for e in events] == [["rollback"]], events
    event = events[0]
    assert event["reason"].startswith("guardrails.rollback.kl_above=1: kl = ") and event["at_step"] >= 1
    assert event["lr"] == pytest.approx(0.5e-4) and event["kl_coef"] == pytest.approx(2 * cfg.algorithm.kl.coef)
    rows = result.rows
    assert [r["step"] for r in rows] == list(range(4))  # the run continued to its last step
    assert all(r["kl"] <= 1.0 for r in rows) and rows[-1]["learner/lr"] == pytest.approx(0.5e-4)
    # Checkpoints of the abandoned timeline are set aside, never deleted; the new ones are in place.
    aside = sorted(p.name for p in cfg.checkpoint_dir.glob("rolled-back-step-*"))
    assert aside and all(int(name.rsplit("-", 1)[1]) < event["at_step"] + 1 for name in aside), aside
    assert (cfg.checkpoint_dir / "step-00000003").is_dir()
    # `rlhf-cluster status RUN_DIR` tells the operator what happened, from the run's files alone.
    # (in this process: the CLI's own code, without a second interpreter importing it, ~3 s of 2 cores)
    shown = CliRunner().invoke(app, ["status", str(cfg.run_dir)])
    assert shown.exit_code == 0, (shown.output, shown.exception)
    assert "state: finished (4 steps)" in shown.output and "steps: 4 of 4" in shown.output, shown.output
    assert "guardrail actions: 1" in shown.output and f"step {event['at_step']}: rolled back (guardrails.rollback" \
        ".kl_above=1: kl = " in shown.output and "learner.lr 5e-05" in shown.output, shown.output


# A second rollback-and-rebuild (~25 s on 2 cores): `make test` rolls back once above, giving up is
# RollbackGuard's own logic (tests/unit/test_guardrails.py) and its error ends a job as any step
# loop error does (test_pipeline.py); `make test-slow` runs the whole story here too.
@pytest.mark.slow
def test_rollbacks_used_up_end_the_run_with_the_condition_named(ray_cluster, job_config):
    cfg = job_config(reference=True,
        name="given-up", learner={"lr": 0.5}, train={"total_steps": 6}, checkpoint={"every_steps": 1},
        guardrails={"rollback": {"kl_above": 1.0, "lr_factor": 1.0, "max_rollbacks": 1}},
    )
    with Job(cfg) as job, pytest.raises(RuntimeError, match=r"guardrails.rollback.kl_above=1: kl = .*giving up: the 1 "
                                        "rollbacks allowed"):
        job.run()
