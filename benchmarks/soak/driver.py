"""What the soak drives and watches from outside the job: its driver process (`rlhf-cluster train`,
started, stopped and resumed), the Ray actors' processes it kills or stops (found by process
title; generation's in rotation, not its warm spares, by their metrics), and the driver's
Prometheus counters."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request
from collections.abc import Collection
from pathlib import Path

import psutil

from benchmarks.common import REPO
from rlhf_cluster.run.run_dir import RunDir

CLI = str(REPO / ".venv" / "bin" / "rlhf-cluster")


class Driver:
    """The job's driver process (`rlhf-cluster train`), started, stopped and resumed by the soak."""

    def __init__(self, config: Path, address: str, workdir: Path):
        self.config, self.address, self.workdir = config, address, workdir
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, resume: bool, *extra: str) -> None:
        self.starts += 1
        log = open(self.workdir / f"driver-{self.starts}.log", "w")
        args = [CLI, "train", str(self.config), "--address", self.address]
        args += ["--resume", "auto"] if resume else ["--overwrite=delete"]
        self.proc = subprocess.Popen([*args, *extra], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout_s: float = 180) -> int:
        """SIGTERM (the job checkpoints and exits 0); SIGKILL after `timeout_s`."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def actor_pids(cls: str, raylets: Collection[int] | None = None) -> list[int]:
    """Live (not stopped) processes of the Ray actor class `cls`, by process title; with `raylets`,
    only those a raylet of these pids started (the soak's cluster's: never another job's on the
    same machine, e.g. a test run beside the soak, which a SIGSTOP of the soak once hit)."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        if cmd and cmd[0].startswith(f"ray::{cls}") and p.info["status"] != psutil.STATUS_STOPPED:
            if raylets is None or started_by(p, raylets):
                out.append(p.pid)
    return sorted(out)


def started_by(process: psutil.Process, pids: Collection[int]) -> bool:
    """Whether one of `process`'s ancestors has one of these pids (False once it is gone)."""
    try:
        return any(parent.pid in pids for parent in process.parents())
    except psutil.Error:
        return False


def serving_pids(run_dir: Path, pool: str, counter: str) -> list[int] | None:
    """The processes of `pool`'s workers that have served: those behind its scrape targets whose
    `counter` is above 0 (e.g. `rlhf_generation_tokens_total`: a warm spare is never sampled from).
    None where that cannot be told (no scrape targets yet, metrics off, no port found)."""
    try:
        targets = json.loads((run_dir / RunDir.SCRAPE_TARGETS).read_text())
    except (OSError, ValueError):
        return None
    ports = [
        int(t["targets"][0].rsplit(":", 1)[1])
        for t in targets
        if t.get("labels", {}).get("pool") == pool and _counter(t["targets"][0], counter) > 0
    ]
    listening = {c.laddr.port: c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.pid}
    pids = sorted(listening[port] for port in ports if port in listening)
    return pids or None


def _counter(target: str, name: str) -> float:
    """A Prometheus endpoint's counter `name`, summed over its labels (0 where it does not answer)."""
    try:
        body = urllib.request.urlopen(f"http://{target}/metrics", timeout=2).read().decode()
    except (OSError, ValueError):
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.split("{")[0].split(" ")[0] == name)


def scrape(run_dir: Path) -> dict[str, float]:
    """The driver's Prometheus counters of interest (summed over labels), or {} if it is not up."""
    try:
        targets = json.loads((run_dir / RunDir.SCRAPE_TARGETS).read_text())
        driver = next(t["targets"][0] for t in targets if t["labels"]["pool"] == "driver")
        body = urllib.request.urlopen(f"http://{driver}/metrics", timeout=5).read().decode()
    except (OSError, ValueError, StopIteration, KeyError):
        return {}
    wanted = (
        "rlhf_weights_fingerprint_mismatches_total",
        "rlhf_pool_worker_restarts_total",
        "rlhf_buffer_dropped_total",
        "rlhf_learner_version",
    )
    out: dict[str, float] = {}
    for line in body.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in wanted:
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out
