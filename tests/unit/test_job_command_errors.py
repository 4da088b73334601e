"""`rlhf-cluster status`, `logs`, `stop` and `scale` on a job the cluster does not know, or a pool the
job does not run, end in one line naming it (trial 23b C2, C3, C4: each printed a traceback from
Ray's job API or from the job's own actor). Ray's clients are stood in for: what they raise is
what the trial saw them raise."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from actors.commands import jobs
from actors.commands.cli import app

NOT_FOUND = "Request failed with status code 404: Job raysubmit_nope does not exist."


class _Client:
    def get_job_info(self, job):
        if job == "raysubmit_nope":
            raise RuntimeError(NOT_FOUND)
        status = SimpleNamespace(value="FAILED")
        return SimpleNamespace(status=status, message="Job entrypoint command failed with exit code 1")

    def get_job_logs(self, job):
        raise RuntimeError(NOT_FOUND)

    def stop_job(self, job):
        raise RuntimeError(NOT_FOUND)


@pytest.fixture
def cluster(monkeypatch):
    monkeypatch.setattr(jobs, "job_client", lambda address: _Client())


@pytest.mark.parametrize("command", ["status", "logs", "stop"])
def test_an_unknown_job_id_is_one_line(cluster, command):
    result = CliRunner().invoke(app, [command, "raysubmit_nope", "--address", "http://h:8265"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: no job 'raysubmit_nope' at http://h:8265") and "Traceback" not in result.output


def test_a_failed_job_says_why(cluster):
    result = CliRunner().invoke(app, ["status", "raysubmit_x", "--address", "http://h:8265"])
    assert result.exit_code == 0 and result.output.strip() == "FAILED: Job entrypoint command failed with exit code 1"


def test_scale_refuses_a_dashboard_url_a_size_below_one_and_names_an_unknown_job_or_pool(monkeypatch):
    import actors.workers.control as control

    runner = CliRunner()
    url = runner.invoke(app, ["scale", "demo", "--pool", "generation", "--replicas", "2", "--address", "http://h:8265"])
    assert url.exit_code == 2 and "give its GCS address (HEAD:6379)" in url.output
    zero = runner.invoke(app, ["scale", "demo", "--pool", "generation", "--replicas", "0"])
    assert zero.exit_code == 2 and "--replicas" in zero.output
    monkeypatch.setattr(jobs, "connect", lambda *a, **k: None)
    refusals = {
        "nojob": ValueError("Failed to look up actor with name 'rlhf-controller-nojob'. This could because ..."),
        "demo": RuntimeError("job demo: resize of teacher failed: 'this job has no teacher pool'"),
    }

    def scaled(name, pool, replicas):
        raise refusals[name]

    monkeypatch.setattr(control, "scale", scaled)
    missing = runner.invoke(app, ["scale", "nojob", "--pool", "generation", "--replicas", "2", "--address", "h:6379"])
    assert missing.exit_code == 2
    assert "error: no running job named 'nojob' on the cluster at h:6379" in missing.output
    teacher = runner.invoke(app, ["scale", "demo", "--pool", "teacher", "--replicas", "2", "--address", "h:6379"])
    assert teacher.exit_code == 2 and "error: job demo: resize of teacher failed: 'this job has no teacher pool'" in (
        teacher.output
    )


def test_submit_passes_resume_and_overwrite_and_the_users_own_command_to_continue(tmp_path, monkeypatch):
    """Trial 23b C1: a stopped submitted job could not be continued through `submit` (no --resume or
    --overwrite; resubmitting was refused for the used run_dir), and its stop line named the job's
    copy of the config. Both ride to the job's `train`; the stop line is the user's submit, resumed."""
    import shlex

    from actors.commands.training import _resume_command

    sent = {}

    class _Submitting(_Client):
        def submit_job(self, **kwargs):
            sent.update(kwargs)
            return "raysubmit_1"

    monkeypatch.setattr(jobs, "job_client", lambda address: _Submitting())
    monkeypatch.chdir(tmp_path)
    from actors.commands.common import REPO

    config = str(REPO / "configs" / "demo.yaml")
    args = ["submit", config, "--address", "http://h:8265", "--set", "run_dir=/shared/r", "--python", sys.executable]
    result = CliRunner().invoke(app, [*args, "--resume", "auto", "--overwrite"])
    assert result.exit_code == 0 and result.output.strip().endswith("raysubmit_1"), result.output
    check, train = sent["entrypoint"].rsplit("; ", 1)
    words = shlex.split(train)
    assert words[-3:] == ["--resume", "auto", "--overwrite=aside"] and words[3:5] == ["train", "job.yaml"]
    # The entrypoint first checks its interpreter (trial 23b C5), in the shell Ray runs it in.
    import subprocess

    assert subprocess.run(["bash", "-c", f"{check}; echo ok"], capture_output=True, text=True).stdout == "ok\n"
    lacking = check.replace(sys.executable, "/nonexistent/python")
    ran = subprocess.run(["bash", "-c", f"{lacking}; echo train"], capture_output=True, text=True)
    assert ran.returncode == 2 and ran.stdout == "" and "lacks rlhf_cluster's dependencies" in ran.stderr
    hint = sent["runtime_env"]["env_vars"][jobs.RESUME_HINT]
    assert hint == (
        f"rlhf-cluster submit {config} --address http://h:8265 --set run_dir=/shared/r --python {sys.executable} "
        "--resume auto"
    )
    monkeypatch.setenv(jobs.RESUME_HINT, hint)
    assert _resume_command(tmp_path / "job.yaml", [], "auto") == hint  # what the job's stop line says
    bad = CliRunner().invoke(app, [*args, "--overwrite=delet"])
    assert bad.exit_code == 2 and "--overwrite=delet: expected" in bad.output


def test_submit_refuses_a_relative_run_dir(monkeypatch):
    """Trial 23b C6: configs/demo.yaml's `run_dir: runs/demo`, submitted, ran inside Ray's per-job
    package folder (which Ray deletes): weights, checkpoints and metrics lost, with no warning."""
    from actors.commands.common import REPO

    monkeypatch.setattr(jobs, "job_client", lambda address: pytest.fail("refused before the cluster is asked"))
    config = str(REPO / "configs" / "demo.yaml")
    result = CliRunner().invoke(app, ["submit", config, "--address", "http://h:8265"])
    assert result.exit_code == 2 and result.output.startswith("error: run_dir=runs/demo: relative"), result.output
    stored = CliRunner().invoke(app, ["submit", config, "--address", "http://h:8265", "--set", "run_dir=/shared/r",
                                      "--set", "weights.dir=w"])  # fmt: skip
    assert stored.exit_code == 2 and "error: weights.dir=w: relative" in stored.output


def test_scale_names_who_sizes_the_pool_in_status_words():
    """Trial 23b C7: `scale` said `pinned` of a pool the job does not autoscale, which `status` calls
    `fixed`, and `--auto` on it said `not auto`."""
    auto_reward = {"auto": ["reward"], "managed": ["reward", "generation"]}
    assert jobs._sizing("reward", auto_reward, None) == "auto"
    assert jobs._sizing("generation", auto_reward, 3) == "pinned (--auto releases it)"
    assert jobs._sizing("reference", auto_reward, 2) == "fixed"
    assert jobs._sizing("reference", auto_reward, None) == "fixed: the job has no scaling.auto.reference to hand it back to"
