"""Experiment trackers (`metrics.tensorboard`, `metrics.wandb`): found comparing with veRL's
`trainer.logger`, OpenRLHF's `--logger.wandb`, slime's `--use-wandb` (rows went to metrics.jsonl
and Prometheus only). Real TensorBoard event files read back with TensorBoard's own reader, and a
real W&B run in offline mode (no network) read back from the files it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_cluster.config import JobConfig
from rlhf_cluster.job.preflight import ConfigError, preflight
from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.telemetry.trackers import open_trackers
from tests.tracker_files import tensorboard_scalars, wandb_history, wandb_records


def _cfg(tmp_path: Path, **metrics) -> JobConfig:
    return JobConfig.model_validate({"name": "tracked", "run_dir": str(tmp_path / "run"), "metrics": metrics})


def test_tensorboard_charts_every_number_of_a_row_and_a_resume_replaces_what_it_logs_again(tmp_path):
    cfg = _cfg(tmp_path, tensorboard=True)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True)
    (first,) = open_trackers(cfg, run, first_step=0)
    for step in range(4):
        first.log({"step": step, "reward_mean": 0.1 * step, "note": "text", "nan": float("nan"), "ok": True}, step)
    first.close()
    scalars = tensorboard_scalars(run)
    assert [s for s, _ in scalars["reward_mean"]] == [0, 1, 2, 3]
    assert [v for _, v in scalars["reward_mean"]] == pytest.approx([0.1 * s for s in range(4)])
    assert "note" not in scalars and "nan" not in scalars and scalars["ok"] == [(s, 1.0) for s in range(4)]
    # Resumed from the checkpoint after step 1: steps 2 and 3 are logged again, with new values.
    (resumed,) = open_trackers(cfg, run, first_step=2)
    for step in (2, 3, 4):
        resumed.log({"step": step, "reward_mean": 1.0 + step}, step)
    resumed.close()
    after = tensorboard_scalars(run)["reward_mean"]
    assert [s for s, _ in after] == [0, 1, 2, 3, 4]
    assert [v for _, v in after] == pytest.approx([0.0, 0.1, 3.0, 4.0, 5.0])
    # A rollback inside the run (a guardrail, a rebuilt learner) rewinds it the same way.
    (again,) = open_trackers(cfg, run, first_step=5)
    again.log({"step": 5, "reward_mean": 6.0}, 5)
    again.rewind(4)
    again.log({"step": 4, "reward_mean": -1.0}, 4)
    again.close()
    assert [v for _, v in tensorboard_scalars(run)["reward_mean"]] == pytest.approx([0.0, 0.1, 3.0, 4.0, -1.0])


def test_wandb_offline_run_holds_the_rows_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = JobConfig.model_validate({
        "name": "tracked", "run_dir": str(tmp_path / "run"),
        "metrics": {"wandb": {"project": "rlhf-test", "mode": "offline", "tags": ["unit"]}},
        "generation": {"agent": {"function": "my_agent:run", "token": "s3cret"}},
    })  # fmt: skip
    run = Path(cfg.run_dir)
    run.mkdir(parents=True)
    (tracker,) = open_trackers(cfg, run, first_step=0)
    for step in range(3):
        tracker.log({"step": step, "reward_mean": 0.5 + step, "kl": 0.01}, step)
    tracker.close()
    run_id = (run / RunDir.WANDB_ID).read_text().strip()
    found = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [p.name for p in found] == [f"run-{run_id}.wandb"], list((run / "wandb").rglob("*"))
    first = found[0]
    records = wandb_records(first)
    (started,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (started.project, started.display_name, list(started.tags)) == ("rlhf-test", "tracked", ["unit"])
    config = {i.key: json.loads(i.value_json) for i in started.config.update}
    assert config["name"] == "tracked" and config["metrics"]["wandb"]["project"] == "rlhf-test"  # the job's config
    assert config["generation"]["agent"]["token"] == "***"  # found in review: the gateway's token went to W&B
    assert wandb_history(records) == [{"step": s, "reward_mean": 0.5 + s, "kl": 0.01} for s in range(3)]
    # Resumed: the same run id (W&B appends to that run), step 2 logged again against the `step` axis.
    (again,) = open_trackers(cfg, run, first_step=2)
    again.log({"step": 2, "reward_mean": 9.0}, 2)
    again.close()
    assert (run / RunDir.WANDB_ID).read_text().strip() == run_id, "a resume started a new W&B run"
    found = set((run / "wandb").glob("offline-run-*/run-*.wandb")) - {first}
    assert [p.name for p in found] == [f"run-{run_id}.wandb"], list((run / "wandb").rglob("*"))
    (second,) = found
    assert wandb_history(wandb_records(second)) == [{"step": 2, "reward_mean": 9.0}]


def test_a_tracker_whose_package_is_missing_is_refused_naming_the_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"metrics.wandb: needs the `wandb` package \(pip install -e '.\[tracking\]'"):
        preflight(_cfg(tmp_path, wandb={"project": "p"}))
    with pytest.raises(ValueError, match="metrics.wandb.project"):
        _cfg(tmp_path, wandb={})


def test_an_online_wandb_run_without_a_key_is_refused_before_anything_starts(tmp_path, monkeypatch):
    """Found in review: without a key an online run failed only at its first step, minutes in."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    cfg = _cfg(tmp_path, wandb={"project": "p"})
    with pytest.raises(ConfigError, match=r"metrics.wandb: no W&B API key here \(WANDB_API_KEY, or `wandb login`\)"):
        preflight(cfg)
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    (tmp_path / "netrc").chmod(0o600)
    preflight(cfg)  # `wandb login` wrote this
    (tmp_path / "netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    preflight(cfg)
    preflight(_cfg(tmp_path, wandb={"project": "p", "mode": "offline"}))


def test_a_folder_named_like_a_tracker_is_no_install(tmp_path, monkeypatch):
    """Review 23a R1: the CLI puts the working directory on sys.path; a run directory holds `wandb/`
    and `tensorboard/` folders, which import as namespace packages: no install of the package."""
    from rlhf_cluster.job.file_checks import _installed

    (tmp_path / "folder_23r1").mkdir()
    (tmp_path / "module_23r1.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert not _installed("folder_23r1") and _installed("module_23r1") and not _installed("nowhere_23r1")
