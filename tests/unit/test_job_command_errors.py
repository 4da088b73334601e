"""`rlhf-cluster status`, `logs`, `stop` and `scale` on a job the cluster does not know, or a pool the
job does not run, end in one line naming it (trial 23b C2, C3, C4: each printed a traceback from
Ray's job API or from the job's own actor). Ray's clients are stood in for: what they raise is
what the trial saw them raise."""

from __future__ import annotations

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
