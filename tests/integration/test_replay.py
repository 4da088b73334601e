"""Record and replay: a job recorded with --record-rollouts is trained again from its recorded
groups, without generation. A replay of the steps of a synchronous run (max_staleness 0) ends in
exactly the state the run checkpointed after them, also when it starts from the run's checkpoint of
an earlier step, so the two replays are bit-identical too. The job is multi-turn (the scripted
environment), so this is also the job test of episodes: their masked samples are trained on,
recorded and replayed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_cluster.run_dir import RunDir
from rlhf_cluster.scored_log import ScoredLog

REPO = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "rlhf-cluster")


def _cli(*args: str) -> str:
    done = subprocess.run([CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _turn_advantages(advantages: list[float], model_tokens: list[int]) -> list[list[float]]:
    """The advantages on each run of model tokens (a turn; observations lie between them)."""
    turns: list[set[float]] = []
    for t, (a, m) in enumerate(zip(advantages, model_tokens)):
        if m and (t == 0 or not model_tokens[t - 1]):
            turns.append(set())
        if m:
            turns[-1].add(a)
    return [sorted(t) for t in turns]


def _digests(out: str) -> list[str]:
    return [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("rank ")]


def test_replays_are_identical_and_match_the_run(ray_cluster, job_config, tmp_path):
    gcs = ray_cluster.get_runtime_context().gcs_address
    cfg = job_config(name="recorded", learner={"world_size": 1, "lr": 1e-3},
                     generation={"environment": "scripted", "max_turns": 2, "turn_max_tokens": 6, "turn_stop": [],
                                 "sampling": {"n": 4, "max_new_tokens": 24},
                                 "turn_rewards": {"combine": "sum", "assign": "turn"}},
                     train={"total_steps": 4, "prompts_per_step": 2, "max_staleness": 0, "progress": False},
                     checkpoint={"every_steps": 2, "keep": 2})
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    _cli("train", str(config), "--record-rollouts", "--address", gcs)
    run_dir = Path(cfg.run_dir)
    assert (run_dir / "config.yaml").exists()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    # The steps trained on episodes: model turns and the environment's observations, masked.
    logged = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert logged and all(0 in r["loss_mask"] and r["loss_mask"].count(1) >= 6 for r in logged)
    assert all("[observation 1]" in r["response"] for r in logged)
    # Per-turn rewards (the scripted environment gives turn k k/10) added to the verifier's final one.
    for r in logged:
        parts = r["reward_components"]
        assert parts["turn_reward"] == pytest.approx(0.1 + 0.2) and r["reward"] == pytest.approx(parts["final_reward"] + 0.3)
    # Turn-level credit (`assign: turn`): the second turn's return leaves out the first turn's 0.1,
    # so in every group with a signal its tokens carry a smaller advantage than the first turn's.
    scored = [s for _, group in ScoredLog(run_dir / RunDir.SCORED_LOG).since(0) for s in group]
    assert scored
    two_turns = [(s, turns) for s in scored if len(turns := _turn_advantages(s.advantages, s.model_tokens)) == 2]
    assert len(two_turns) >= len(scored) // 2, "few episodes had two non-empty turns: nothing was checked"
    for s, turns in two_turns:  # (a turn that sampled EOS at once has no tokens, hence no run of its own)
        assert all(len(t) == 1 for t in turns), (s.sample_id, turns)  # one advantage per turn
        assert turns[1][0] < turns[0][0] or turns[0][0] == turns[1][0] == 0.0, (s.sample_id, turns)
    assert any(s.advantages[0] != 0.0 for s in scored), "no group had a signal: nothing was checked"

    # (A second full replay, compared with the first, is not run: both are compared with the run's
    # own checkpoint below, which the first must equal bit for bit, and the tail replay too.)
    first = _cli("replay", str(run_dir), "--out", str(tmp_path / "replay-a"), "--address", gcs)
    assert _digests(first)
    # All four steps: exactly the state the run checkpointed after its fourth step.
    assert "the run's checkpoint of step 3: identical" in first
    manifest = json.loads(next((run_dir / "checkpoints").glob("step-*3/manifest.json")).read_text())
    assert _digests(first) == manifest["rank_digests"]
    # Steps 2..3 from the run's checkpoint of step 1 end in the same state.
    tail = _cli("replay", str(run_dir), "--steps", "2:3", "--out", str(tmp_path / "replay-c"), "--address", gcs)
    assert _digests(tail) == _digests(first)
