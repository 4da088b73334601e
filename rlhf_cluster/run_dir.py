"""The files of one run, by name: every component reads and writes the run directory through here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rlhf_cluster.fileio import write_atomic
from rlhf_cluster.run_lock import RunLock


class RunDirInUse(RuntimeError):
    """A fresh job was pointed at a directory that holds an earlier run's results."""


class RunDir:
    """Names every file of a run under `root` (`run_dir` in the config) and owns their lifecycle.

    A fresh (not resumed) run starts by removing an earlier run's artifacts; a resumed run keeps
    the JSONL rows of the steps its checkpoint covers.
    """

    METRICS = "metrics.jsonl"  # one row per learner step
    CONSUMED = "consumed.jsonl"  # provenance of every sample trained on
    PROBES = "probes.jsonl"  # each worker's post-load mismatch probe
    TIMELINE = "rollout_timeline.jsonl"  # per prompt group: when it was requested, generated, buffered
    CONFIG = "config.yaml"  # the job's whole config, as it ran (a resume writes its own)
    SAMPLES = "samples.jsonl"  # per step, the decoded highest-, lowest-reward and random responses
    TRACE = "trace.jsonl"  # spans of every actor's work (rlhf_cluster.tracing; `rlhf-cluster trace` converts)
    BUFFER = "buffer.arrow"  # scored samples not yet trained on, at the end of a run
    SCORED_LOG = "scored"  # every scored group as it arrives (ScoredLog segments)
    RESUME = "resume.json"  # which checkpoint a resumed run started from
    EVAL = "eval.json"  # held-out accuracy before and after
    SCRAPE_TARGETS = "prometheus_targets.json"  # Prometheus file-based service discovery
    ENGINE_INT8 = "engine-int8"  # the int8 checkpoint generation engines start from
    # Inside a job checkpoint:
    DRIVER_STATE = "driver.json"
    CHECKPOINT_BUFFER = "buffer.arrow"
    CRITIC = "critic"  # the critic's rank checkpoints

    STEP_LOGS = (METRICS, CONSUMED, SAMPLES)

    def __init__(self, root: str | Path, weights_dir: Path, checkpoint_dir: Path):
        self.root = Path(root).expanduser()
        self.weights_dir = weights_dir
        self.checkpoint_dir = checkpoint_dir

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    def prepare(self, fresh: bool, job_name: str, overwrite: bool = False) -> "RunDir":
        """Take the directory's lock (`RunDirBusy` while another job holds it), then for a fresh
        run remove an earlier run's artifacts, which only `overwrite` allows: a fresh job never
        silently wipes a run that trained (`RunDirInUse` names what is there)."""
        self.lock = RunLock(self.root, job_name)
        stale = (self.weights_dir, self.checkpoint_dir, *(self.root / n for n in (
            self.METRICS, self.CONSUMED, self.PROBES, self.BUFFER, self.RESUME, self.ENGINE_INT8, self.TIMELINE,
            self.SCORED_LOG, self.TRACE, self.SAMPLES)))
        if fresh and not overwrite:
            trained = self.read(self.METRICS)
            checkpoints = sorted(p.name for p in self.checkpoint_dir.glob("step-*")) if self.checkpoint_dir.is_dir() else []
            if trained or checkpoints:
                self.release()
                raise RunDirInUse(
                    f"run_dir {self.root} holds an earlier run ({len(trained)} steps in {self.METRICS}"
                    f"{', checkpoints up to ' + checkpoints[-1] if checkpoints else ''}): continue it with "
                    "--resume auto, or start over with --overwrite (deletes its metrics, checkpoints and weights)"
                )
        for path in stale if fresh else ():
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        return self

    def release(self) -> None:
        """Let another job use the directory (also happens when this process exits)."""
        lock = getattr(self, "lock", None)
        if lock is not None:
            lock.release()

    def append(self, name: str, rows: list[dict]) -> None:
        """Append rows to a JSONL file of the run."""
        with open(self.root / name, "a") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in rows)

    def read(self, name: str) -> list[dict]:
        """The rows of a JSONL file of the run (none if it does not exist)."""
        path = self.root / name
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def write_json(self, name: str, value: dict) -> None:
        write_atomic(self.root / name, json.dumps(value, indent=1))

    def write_yaml(self, name: str, value: dict) -> None:
        import yaml

        write_atomic(self.root / name, yaml.safe_dump(value, sort_keys=False))

    def keep_steps(self, last_step: int) -> None:
        """Keep the step logs' rows of steps <= last_step, so a resumed run's logs continue the original's."""
        for name in self.STEP_LOGS:
            rows = self.read(name)
            write_atomic(self.root / name, "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= last_step))
