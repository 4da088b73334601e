"""A job driven from the CLI as an operator would: a reward function that raises, returns NaN
or hangs on some prompts; a second job pointed at the live job's run_dir; SIGTERM, then SIGINT,
each followed by `--resume auto` (the first at a new learning rate, KL coefficient and learner
world size 2 -> 1, the second back to the config's, 1 -> 2, under a supervisor whose driver is
SIGKILLed once and resumed). Every stop exits 0 with a checkpoint of the last trained step, every
step is trained exactly once over the runs, no sample twice, nothing on a bad reward. The policy is
the tiny mixture of experts with rollout routing replay: every scored and buffered sample keeps
the experts its engine routed it to across the stops (the learner refuses a sample without them)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import ray
import yaml
from typer.testing import CliRunner

from actors.commands.cli import app
from rlhf_cluster.data.prompts import read_prompt_file
from rlhf_cluster.experience.records import table_to_samples
from rlhf_cluster.fileio import read_jsonl
from rlhf_cluster.run.checkpoint import CheckpointStore
from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.run.scored_log import ScoredLog

REPO = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "rlhf-cluster")
STEPS = 9


def flaky_reward(response: str, answer: str) -> float:
    """Broken on a fixed share of prompts (by answer): raises, NaN, or hangs past the timeout."""
    kind = int(answer) % 9
    if kind == 0:
        raise ValueError(f"cannot score against {answer}")
    if kind == 1:
        return math.nan
    if kind == 2:
        time.sleep(5)  # past the 0.5 s timeout: abandoned, the group dropped
    return 1.0 if response.strip() == answer else min(len(set(response)), 10) / 10


def bad_reward(answer: str) -> bool:
    return int(answer) % 9 in (0, 1, 2)


def _launch(config: Path, *extra: str) -> subprocess.Popen:
    gcs = ray.get_runtime_context().gcs_address
    return subprocess.Popen([CLI, "train", str(config), "--address", gcs, *extra], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def _refused(config: Path, *extra: str):
    """`rlhf-cluster train CONFIG` refused (exit code 2, a message, no traceback) before Ray starts:
    run in this process (the CLI's own code; a second interpreter importing it all costs ~3 s of a
    2-core machine, beside a running job), with `ray.init` failing the test if it is reached."""

    def reached(*args, **kwargs):
        raise AssertionError("the refused command reached ray.init")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray, "init", reached)
        done = CliRunner().invoke(app, ["train", str(config), "--address", ray.get_runtime_context().gcs_address,
                                        *extra])
    assert done.exit_code == 2 and isinstance(done.exception, SystemExit), (done.output, done.exception)
    return done


def _rows(run_dir: Path) -> list[dict]:
    """The steps logged so far (a line the driver is still appending is left out)."""
    return read_jsonl(run_dir / "metrics.jsonl").rows


def _stop_after(proc: subprocess.Popen, run_dir: Path, rows: int, sig: signal.Signals) -> str:
    """Signal the driver once `rows` steps are logged; returns its output (it must exit 0 in bound)."""
    deadline = time.monotonic() + 300
    while len(_rows(run_dir)) < rows:
        assert proc.poll() is None, f"the run ended early:\n{proc.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.1)
    os.kill(proc.pid, sig)  # the driver process only, as `kill` or a scheduler would
    out, _ = proc.communicate(timeout=120)  # well within faults.preempt_grace_s
    assert proc.returncode == 0, out[-4000:]
    return out


def test_stops_resume_and_bad_rewards_from_the_cli(ray_cluster, job_config, tmp_path):
    cfg = job_config(reference=True,
        name="stop-resume",
        model={"tiny": {"architecture": "qwen3_moe"}},
        algorithm={"routing_replay": "rollout"},
        generation={"replicas": 1, "prompts_per_request": 1, "sampling": {"n": 4, "max_new_tokens": 8}},
        scoring={"rewards": [{"type": "function", "function": "tests.integration.test_stop_and_resume:flaky_reward",
                              "on_error": "drop", "timeout_s": 0.5}]},
        learner={"world_size": 2, "lr": 1e-3},
        train={"total_steps": STEPS, "prompts_per_step": 2, "max_staleness": 1, "progress": False},
        checkpoint={"every_steps": 100},  # only the stops (and the end) write checkpoints
    )
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    run_dir, store = Path(cfg.run_dir), CheckpointStore(cfg.checkpoint_dir)

    driver = _launch(config)
    while not (run_dir / "metrics.jsonl").exists():
        assert driver.poll() is None, driver.stdout.read()[-4000:]
        time.sleep(0.1)
    # A second job on the live job's run_dir is refused with one line naming the first; nothing is touched.
    intruder = _refused(config, "--overwrite")
    assert "is in use by job 'stop-resume'" in intruder.stderr, intruder.stderr
    out = _stop_after(driver, run_dir, 3, signal.SIGTERM)
    assert "SIGTERM: stopping after the step in progress" in out and "continue with:" in out and "--resume auto" in out
    resumed_at = []
    for stop_number, sig in ((1, signal.SIGINT), (2, None)):
        done = len(_rows(run_dir))
        resumed_at.append(done)
        ckpt = store.latest()
        assert ckpt is not None and ckpt.step == done - 1, "the stop's checkpoint holds every trained step"
        if stop_number == 1:  # starting over without --resume or --overwrite is refused: the stopped run is kept
            refused = _refused(config)
            assert "--resume auto" in refused.stderr, refused.stderr
        # The first resume also changes the learning rate and the KL coefficient (they apply) and
        # shrinks the learner from 2 ranks to 1; the second grows it back to the config's 2.
        overrides = ["--set", "learner.lr=0.0005", "--set", "algorithm.kl.coef=0.05",
                     "--set", "learner.world_size=1"] if stop_number == 1 else []
        if sig is not None:
            proc = _launch(config, "--resume", "auto", *overrides)
            out = _stop_after(proc, run_dir, done + 3, sig)
            assert f"{sig.name}: stopping" in out and "learner: resharded from 2 to 1 ranks" in out
        else:
            # The last run has a supervisor (--max-retries): its driver is SIGKILLed once, as soon as
            # it holds the run directory (as the OOM killer would), and is resumed to the end.
            before = json.loads((run_dir / "job.lock").read_text() or "{}").get("pid")  # empty once released
            proc = _launch(config, "--resume", "auto", "--max-retries", "1")
            while (holder := json.loads((run_dir / "job.lock").read_text() or "{}").get("pid", before)) == before:
                assert proc.poll() is None, proc.stdout.read()[-4000:]
                time.sleep(0.05)
            os.kill(holder, signal.SIGKILL)
            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, out[-4000:]
            assert "driver exited with -9; resuming from the newest checkpoint (retry 1 of 1)" in out
            assert "done:" in out and "learner: resharded from 1 to 2 ranks" in out

    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == list(range(STEPS)), "every step once over the three runs"
    # The first resume's --set values apply over the checkpoint's; the second resume, without them,
    # is back at the config file's (a change in either direction applies).
    first, second = resumed_at
    for part, lr, coef in ((rows[:first], cfg.learner.lr, cfg.algorithm.kl.coef), (rows[first:second], 0.0005, 0.05),
                           (rows[second:], cfg.learner.lr, cfg.algorithm.kl.coef)):
        assert {r["learner/lr"] for r in part} == {lr} and {r["kl_coef"] for r in part} == {coef}, (resumed_at, rows)
    assert store.latest().step == STEPS - 1
    consumed = [json.loads(x) for x in (run_dir / "consumed.jsonl").read_text().splitlines()]
    ids = [c["sample_id"] for c in consumed]
    assert len(ids) == len(set(ids)) == STEPS * cfg.samples_per_step
    answer_of = {p.prompt_id: p.answer for p in read_prompt_file(run_dir / "data" / "train.parquet")}
    assert not [c for c in consumed if bad_reward(answer_of[c["prompt_id"]])], "trained on a group whose reward failed"
    assert all(math.isfinite(r["reward_mean"]) for r in rows)
    assert rows[-1]["dropped_reward_failed"] > 0, "no broken reward was met: the test tested nothing"
    # Each failure is on record in events.jsonl (a row per rollout request and worker: the soak's detection).
    failures = [e for e in read_jsonl(run_dir / RunDir.EVENTS).rows if e.get("event") == "reward_failed"]
    assert sum(e["samples"] for e in failures) >= rows[-1]["dropped_reward_failed"], failures
    assert all(e["worker"] for e in failures), failures
    # Routing replay held over the stops: the learner measured it every step, and every sample the
    # scored log and the checkpoints' buffers kept (what a resume reads back) has its routed experts.
    assert all(0 < r["routing/expert_set_agreement"] <= 1 and r["routing/mismatch_k3_with_replay"] >= 0 for r in rows)
    kept = [s for _, group in ScoredLog(run_dir / RunDir.SCORED_LOG).since(0) for s in group]
    for ckpt in store.list():
        with pa.memory_map(str(ckpt / RunDir.CHECKPOINT_BUFFER)) as source:
            kept += table_to_samples(pa.ipc.open_file(source).read_all())
    assert kept and all(_routed_whole(s, cfg.model.tiny.num_layers) for s in kept), "a sample lost its routing"


def _routed_whole(sample, layers: int) -> bool:
    """The sample's routing covers its sequence from `start` to the token before its last."""
    routed = sample.routed_experts
    length = len(sample.prompt_ids) + len(sample.response_ids)
    return routed is not None and routed.start + routed.tokens == length - 1 and routed.layers == layers
