"""A job that ends with an error leaves its cause in events.jsonl (one `failed` row, written by the
driver while it holds the run directory), and `rlhf-cluster status` shows the run as failed with
that cause until a later start or resume; a stop (Ctrl-C) is no failure. Real run directories."""

from __future__ import annotations

import json

import pytest
import ray

import actors.driver
import actors.job
from actors.driver import Driver
from actors.job import run_job
from rlhf_cluster.run import run_dir as run_dir_module
from rlhf_cluster.run.run_dir import FAILED, RunDir, failure_cause
from rlhf_cluster.run.status import describe_run
from rlhf_cluster.scoring.rewards import RewardFunctionError
from tests.unit.test_full_disk import _FullFor

REWARD_ERROR = ("reward function tests.rewards:broken failed on prompt 'p-3' (sample 7): ZeroDivisionError: "
                "division by zero (scoring.rewards on_error: fail; `drop` drops such groups instead)")


def _events(cfg) -> list[dict]:
    return [json.loads(line) for line in (RunDir(cfg.run_dir, cfg.weights_dir, cfg.checkpoint_dir) / RunDir.EVENTS)
            .read_text().splitlines()]


def _state(cfg) -> str:
    [line] = [x for x in describe_run(RunDir(cfg.run_dir, cfg.weights_dir, cfg.checkpoint_dir).root)
              if x.startswith("state: ")]
    return line


class _StartedDriver(Driver):
    """What a started driver leaves in its run directory (the lock, config.yaml, `pools_started`),
    with a `run` that ends as `outcome` says: no Ray, no actors."""

    outcome: BaseException

    def __init__(self, cfg, resume=None, overwrite=False):
        self.cfg = cfg
        self.run_dir = RunDir(cfg.run_dir, cfg.weights_dir, cfg.checkpoint_dir).prepare(True, cfg.name, overwrite)
        self.run_dir.write_yaml(RunDir.CONFIG, cfg.model_dump(mode="json"))
        self.run_dir.event("pools_started", sizes={"generation": 1}, auto=[], spares={})

    async def run(self):
        raise self.outcome


@pytest.fixture
def started(job_config, monkeypatch):
    monkeypatch.setattr(actors.job, "Driver", _StartedDriver)
    return job_config(train={"total_steps": 3})


def test_a_failed_job_records_its_cause_and_status_shows_it_until_a_resume(started):
    cfg = started
    # The reward worker's error, as Ray hands it to the driver: wrapped in a RayTaskError.
    _StartedDriver.outcome = ray.exceptions.RayTaskError(
        "score", "Traceback (most recent call last):\n  ...", RewardFunctionError(REWARD_ERROR)
    ).as_instanceof_cause()
    with pytest.raises(RewardFunctionError):
        run_job(cfg)
    events = _events(cfg)
    assert [e["event"] for e in events] == ["pools_started", FAILED]
    assert events[-1]["error"] == f"RewardFunctionError: {REWARD_ERROR}"
    assert _state(cfg) == f"state: failed (RewardFunctionError: {REWARD_ERROR})"
    # A resume (its `resumed` row) supersedes the failure: the run is no longer shown as failed.
    RunDir(cfg.run_dir, cfg.weights_dir, cfg.checkpoint_dir).event("resumed", from_step=0)
    assert _state(cfg) == "state: not running"


def test_a_stop_is_no_failure(started):
    _StartedDriver.outcome = KeyboardInterrupt("the job did not stop within 30 s of SIGINT")
    with pytest.raises(KeyboardInterrupt):
        run_job(started)
    assert [e["event"] for e in _events(started)] == ["pools_started"]
    assert _state(started) == "state: not running"


def test_a_failed_start_is_recorded_and_a_refused_job_writes_nothing(job_config, monkeypatch):
    cfg = job_config()

    def broken_inputs(cfg, run_dir, checked):
        run_dir.write_yaml(RunDir.CONFIG, cfg.model_dump(mode="json"))
        raise FileNotFoundError("data.train_file: /data/missing.parquet not found")

    monkeypatch.setattr(actors.driver, "prepare_inputs", broken_inputs)
    with pytest.raises(FileNotFoundError):
        Driver(cfg)
    assert [(e["event"], e["error"]) for e in _events(cfg)] == [
        (FAILED, "FileNotFoundError: data.train_file: /data/missing.parquet not found")
    ]
    assert _state(cfg) == "state: failed (FileNotFoundError: data.train_file: /data/missing.parquet not found)"
    # A job refused the directory (another job holds it) writes no row there: it is not that run's end.
    run = RunDir(cfg.run_dir, cfg.weights_dir, cfg.checkpoint_dir).acquire("other-job")
    try:
        with pytest.raises(Exception, match="in use"):
            Driver(cfg)
    finally:
        run.release()
    assert len(_events(cfg)) == 1


def test_the_cause_is_one_line_and_bounded():
    assert failure_cause(ValueError("bad value\n  at line 3")) == "ValueError: bad value"
    assert failure_cause(RuntimeError()) == "RuntimeError"
    cut = failure_cause(RuntimeError("x" * 1000))
    assert len(cut) == 300 and cut.startswith("RuntimeError: xxx") and cut.endswith("...")


def test_on_a_full_disk_the_failure_is_a_warning_at_once_with_nothing_half_written(job_config, monkeypatch, caplog):
    cfg = job_config()
    driver = Driver.__new__(Driver)  # only its run directory: what the end-of-job path uses
    driver.run_dir = RunDir(cfg.run_dir, cfg.weights_dir, cfg.checkpoint_dir).prepare(True, cfg.name)
    driver.run_dir.event("pools_started", sizes={}, auto=[], spares={})
    before = (driver.run_dir / RunDir.EVENTS).read_text()
    slept = []
    monkeypatch.setattr(run_dir_module, "open", _FullFor(tries=10**6), raising=False)  # full throughout
    monkeypatch.setattr(run_dir_module.time, "sleep", slept.append)
    driver.record_failure(OSError(28, "No space left on device"))  # the failure may be the full disk itself
    assert not slept, "the job's end waited for space"
    assert "the job's failure was not recorded" in caplog.text
    assert (driver.run_dir / RunDir.EVENTS).read_text() == before
    driver.shutdown()


def test_a_fresh_run_sets_the_earlier_runs_events_aside(job_config):
    cfg = job_config()
    earlier = RunDir(cfg.run_dir, cfg.weights_dir, cfg.checkpoint_dir).prepare(True, cfg.name)
    earlier.event("pools_started", sizes={}, auto=[], spares={})
    earlier.event(FAILED, error="ValueError: the earlier run's cause")
    earlier.release()
    fresh = RunDir(cfg.run_dir, cfg.weights_dir, cfg.checkpoint_dir).prepare(True, cfg.name, overwrite=True)
    try:
        assert not (fresh / RunDir.EVENTS).exists()
        [aside] = fresh.root.parent.glob(f"{fresh.root.name}.old-*")
        assert "pools_started" in (aside / RunDir.EVENTS).read_text()
    finally:
        fresh.release()


@pytest.mark.parametrize("refused", ["epochs", "overlong"])
def test_inputs_the_start_refuses_leave_an_earlier_run_where_it_was(job_config, tmp_path, refused):
    """Trial 23a B1: a user's prompt file the start refuses (an epoch without a step, a prompt too
    long for a response) was read after the run was opened: `--overwrite` had moved the earlier
    run aside, and the refused start left a `failed` row and a lock behind. The file is read before."""
    rows = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(3)]
    if refused == "overlong":
        rows[2]["prompt"] = "1+" * 300 + "1="
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = {"total_epochs": 1, "prompts_per_step": 8 if refused == "epochs" else 1}
    cfg = job_config(data={"path": str(data), "verifier": "arithmetic", "eval_prompts": 0}, train=train)
    root = RunDir(cfg.run_dir, cfg.weights_dir, cfg.checkpoint_dir).root
    root.mkdir(parents=True)
    (root / "metrics.jsonl").write_text("".join(json.dumps({"step": i}) + "\n" for i in range(5)))
    match = "the 3 training prompts are fewer than" if refused == "epochs" else "1 prompt\\(s\\) longer than"
    with pytest.raises(ValueError, match=match):
        Driver(cfg, overwrite="aside")
    assert sorted(p.name for p in root.iterdir()) == ["metrics.jsonl"]  # no lock, no `failed` row, nothing moved
    assert not list(root.parent.glob(f"{root.name}.old-*"))
