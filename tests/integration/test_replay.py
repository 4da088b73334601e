"""Record and replay: a job recorded with --record-rollouts is trained again from its recorded
groups, without generation. Two replays give bit-identical learner states, and a replay of the
first steps of a synchronous run (max_staleness 0) ends in exactly the state the run
checkpointed at that step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "rlhf-cluster")


def _cli(*args: str) -> str:
    done = subprocess.run([CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _digests(out: str) -> list[str]:
    return [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("rank ")]


def test_replays_are_identical_and_match_the_run(ray_cluster, job_config, tmp_path):
    gcs = ray_cluster.get_runtime_context().gcs_address
    cfg = job_config(name="recorded", learner={"world_size": 1, "lr": 1e-3},
                     train={"total_steps": 4, "prompts_per_step": 2, "max_staleness": 0, "progress": False},
                     checkpoint={"every_steps": 2, "keep": 2})
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    _cli("train", str(config), "--record-rollouts", "--address", gcs)
    run_dir = Path(cfg.run_dir)
    assert (run_dir / "config.yaml").exists()

    first = _cli("replay", str(run_dir), "--out", str(tmp_path / "replay-a"), "--address", gcs)
    second = _cli("replay", str(run_dir), "--out", str(tmp_path / "replay-b"), "--address", gcs)
    assert _digests(first) and _digests(first) == _digests(second)
    # All four steps: the state the run checkpointed after its last step, exactly.
    assert "the run's checkpoint of step 3: identical" in first
    # The first two steps: the run's checkpoint of step 1.
    head = _cli("replay", str(run_dir), "--steps", "0:1", "--out", str(tmp_path / "replay-c"), "--address", gcs)
    assert "the run's checkpoint of step 1: identical" in head
    manifest = json.loads(next((run_dir / "checkpoints").glob("step-*1/manifest.json")).read_text())
    assert _digests(head) == manifest["rank_digests"]
    # Steps 2..3 from the run's checkpoint of step 1 end where the whole replay did.
    tail = _cli("replay", str(run_dir), "--steps", "2:3", "--out", str(tmp_path / "replay-d"), "--address", gcs)
    assert _digests(tail) == _digests(first)
