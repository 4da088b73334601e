"""An hour of chaos (issue 58): the demo's job, with more pools than the demo and a tenth of its
learning rate (so that it learns over most of the hour, not only its first minutes), on a Ray cluster of
two raylets on this machine, for `--minutes` of wall time while a seeded schedule of faults hits
it; then the run directory and the Prometheus scrapes are checked (rlhf_cluster/run/invariants.py).

    .venv/bin/python benchmarks/soak.py --minutes 60 --seed 0        (make soak)

The job: 2 generation workers (on the second raylet, which the soak kills and restarts), 2 reward
workers, a reference worker, 2 learner ranks, the collective weight transport, the run directory
on a size-limited tmpfs (where the machine lets root mount one). The schedule (_soak_plan.py, from
the seed alone) is rounds of every fault kind in a seeded order, at seeded gaps; a fault is injected
at its planned time or once the one before has recovered, whichever is later, so each fault's
detection and recovery are timed on their own. A fault's detection is its recovery's row in
events.jsonl (`FAULTS` names which); its recovery, the first step trained after that.

At the end the driver is stopped and resumed for a few last steps with the held-out evaluation,
whose sampled accuracy is held to the job's start plus a learning margin (_soak_report.learned);
the job also evaluates every 1,000 steps, and the report lists those evaluations by step.
The report (_soak_report.py; printed, and JSON under benchmarks/results/soak/) gives faults by
kind, detection and recovery times, steps per minute with and without a fault being recovered
from, and every invariant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _soak_plan import CLASS_OF, FAULTS, RECOVERY_BOUND_S, Planned, plan  # noqa: E402
from _soak_report import Outcome, build_report  # noqa: E402

from rlhf_cluster.fileio import CorruptLogError  # noqa: E402
from rlhf_cluster.run.invariants import Fault, detections  # noqa: E402
from rlhf_cluster.run.run_dir import RunDir  # noqa: E402

# As the CLI does (actors/commands/cli.py): Ray turns token auth on where ~/.ray/auth_token exists, so the
# cluster started here must too (before ray is imported), or the drivers it serves cannot start actors.
if (Path.home() / ".ray" / "auth_token").exists():
    os.environ.setdefault("RAY_AUTH_MODE", "token")
CLI = str(REPO / ".venv" / "bin" / "rlhf-cluster")
SOAK_LR = 3.0e-5


def job_config(workdir: Path, run_dir: Path) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg.update(name="soak", run_dir=str(run_dir))
    cfg["generation"].update(replicas=2, resources={"custom": {"soak_gen": 1}})
    cfg["scoring"] = {
        "reward_replicas": 2,
        "reference_replicas": 1,
        "rewards": [
            {
                "type": "function",
                "function": "benchmarks._soak_reward:arithmetic",
                "on_error": "drop",
                "timeout_s": 2.0,
                "max_failure_fraction": 1.0,
            }
        ],
    }
    cfg["weights"] = {"transport": {"type": "collective"}}
    cfg["train"].update(total_steps=1_000_000, progress=False)
    # A tenth of the demo's learning rate: at the demo's, this job has learned all it will by step ~3,000
    # of the hour's ~14,000 (entropy ~0.01, one distinct answer in most groups, no gradient in ~80% of
    # steps), and from there its held-out accuracy drifts under rare single-group Adam updates, with or
    # without faults (benchmarks/README.md, soak.py): no yardstick for what faults do to learning.
    cfg["learner"]["lr"] = SOAK_LR
    cfg["data"]["eval_every_steps"] = 1000  # ~1 s each: the held-out accuracy over the hour, in the report
    cfg["checkpoint"] = {"every_steps": 20, "keep": 2}
    cfg["metrics"] = {"trace": False, "samples_top": 1, "samples_random": 0}
    cfg["faults"] = {
        "max_worker_restarts": 100_000,
        "max_learner_restarts": 100_000,
        "restart_backoff_s": 0.1,
        "heartbeat_interval_s": 1.0,
        "heartbeat_timeout_s": 5.0,
    }
    path = workdir / "soak.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


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


def actor_pids(cls: str) -> list[int]:
    """Live (not stopped) processes of the Ray actor class `cls`, by process title."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        if cmd and cmd[0].startswith(f"ray::{cls}") and p.info["status"] != psutil.STATUS_STOPPED:
            out.append(p.pid)
    return sorted(out)


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


class Soak:
    def __init__(self, args: argparse.Namespace):
        from ray.cluster_utils import Cluster

        self.args = args
        self.workdir = Path(args.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        for stale in self.workdir.glob("driver-*.log"):  # an earlier soak's: the report names this one's
            stale.unlink()
        shutil.rmtree(self.workdir / "run", ignore_errors=True)  # its logs' copy (close), not to be merged
        self.disk = self.workdir / "disk"
        self.disk.mkdir(exist_ok=True)
        self.tmpfs = _mount_tmpfs(self.disk, args.disk_mb)
        self.run_dir = self.disk / "run"
        self.logs = RunDir(self.run_dir, self.run_dir / "weights", self.run_dir / "checkpoints")
        self.mode_file = self.workdir / "reward_mode"
        self.mode_file.write_text("ok")
        os.environ["SOAK_REWARD_MODE"] = str(self.mode_file)
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 16, "include_dashboard": False})
        self.gen_node = self.cluster.add_node(num_cpus=4, resources={"soak_gen": 3})
        self.cluster.wait_for_nodes()
        self.driver = Driver(job_config(self.workdir, self.run_dir), self.cluster.address, self.workdir)
        self.scrapes: list[dict] = []  # the last scrape of each driver's life
        self.last_scrape: dict[str, float] = {}
        self.replicas = 2
        self.crashes: list[dict] = []  # the driver's exits the soak did not ask for

    # ---- what the run directory says ----------------------------------------------------
    def read(self, name: str) -> list[dict]:
        """A log of the run directory as it is now (none while it cannot be read: a full disk, a move)."""
        with contextlib.suppress(OSError, CorruptLogError):
            return self.logs.read(name)
        return []

    def rows(self) -> list[dict]:
        return self.read(RunDir.METRICS)

    def events(self) -> list[dict]:
        return self.read(RunDir.EVENTS)

    def step_after(self, t: float, timeout_s: float) -> dict | None:
        """The first step row written after wall time `t` (None within `timeout_s`); a driver that
        exited meanwhile is resumed (and counted)."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            row = next((r for r in self.rows() if r.get("time", 0) > t), None)
            if row is not None:
                return row
            self.keep_driver_up()
            self.last_scrape = scrape(self.run_dir) or self.last_scrape
            time.sleep(0.5)
        return None

    def keep_driver_up(self) -> None:
        rc = self.driver.exited()
        if rc is not None:
            print(f"[soak] the driver exited ({rc}) on its own: resuming", flush=True)
            self.crashes.append({"time": time.time(), "rc": rc, "log": f"driver-{self.driver.starts}.log"})
            self.scrapes.append(self.last_scrape)
            self.last_scrape = {}
            self.driver.start(resume=True)

    # ---- faults --------------------------------------------------------------------------
    def inject(self, p: Planned) -> Fault | None:
        pool, detected_by = FAULTS[p.kind]
        now = time.time()
        if p.kind.startswith(("kill_", "stop_")) and p.kind not in ("kill_learner", "stop_learner"):
            pids = actor_pids(CLASS_OF[pool])
            if not pids:
                return None
            os.kill(pids[p.pick % len(pids)], signal.SIGKILL if p.kind.startswith("kill") else signal.SIGSTOP)
        elif p.kind in ("kill_learner", "stop_learner"):
            pids = actor_pids("LearnerRank")
            if not pids:
                return None
            os.kill(pids[p.pick % len(pids)], signal.SIGKILL if p.kind == "kill_learner" else signal.SIGSTOP)
        elif p.kind == "push_interrupted":  # an engine killed as a step's version goes out to the engines
            seen = len(self.rows())
            while len(self.rows()) <= seen and time.time() < now + 60:
                time.sleep(0.005)
            pids = actor_pids(CLASS_OF["generation"])
            if not pids:
                return None
            now = time.time()
            os.kill(pids[p.pick % len(pids)], signal.SIGKILL)
        elif p.kind == "raylet_restart":
            self.cluster.remove_node(self.gen_node)
            time.sleep(p.hold_s)
            self.gen_node = self.cluster.add_node(num_cpus=4, resources={"soak_gen": 3})
        elif p.kind == "driver_sigterm":
            self.scrapes.append(scrape(self.run_dir) or self.last_scrape)
            self.last_scrape = {}
            rc = self.driver.stop()
            if rc != 0:
                self.crashes.append({"time": time.time(), "rc": rc, "log": f"driver-{self.driver.starts}.log"})
            self.driver.start(resume=True)
        elif p.kind in ("reward_failing", "reward_hanging"):
            self.mode_file.write_text("fail" if p.kind == "reward_failing" else "hang")
            time.sleep(p.hold_s)
            self.mode_file.write_text("ok")
        elif p.kind == "disk_full":
            if not self.tmpfs:
                return None
            ballast = self.disk / "ballast"
            with open(ballast, "wb") as fh, contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * (1 << 20))
                    fh.flush()
            time.sleep(p.hold_s)
            ballast.unlink()
        elif p.kind == "scale_generation":
            self.replicas = 3 if self.replicas == 2 else 2
            subprocess.run(
                [
                    CLI,
                    "scale",
                    "soak",
                    "--pool",
                    "generation",
                    "--replicas",
                    str(self.replicas),
                    "--address",
                    self.cluster.address,
                ],
                check=True,
                capture_output=True,
                timeout=300,
            )
        return Fault(now, p.kind, detected_by, pool)

    # ---- the run -------------------------------------------------------------------------
    def run(self) -> dict:
        args = self.args
        kinds = [k for k in (args.kinds or FAULTS) if k != "disk_full" or self.tmpfs]
        schedule = plan(args.seed, args.minutes, args.faults, kinds)
        self.driver.start(resume=False)
        first = self.step_after(0, 900)
        if first is None:
            raise RuntimeError(f"the job trained no step in 900 s: see {self.workdir}/driver-1.log")
        began = time.time()
        end = began + args.minutes * 60
        injected: list[dict] = []
        planned_at = began
        for p in schedule:
            planned_at += p.gap_s
            while time.time() < min(planned_at, end):
                self.keep_driver_up()
                self.last_scrape = scrape(self.run_dir) or self.last_scrape
                time.sleep(1)
            if time.time() >= end:
                break
            fault = self.inject(p)
            if fault is None:
                print(f"[soak] {p.kind}: nothing to hit, skipped", flush=True)
                continue
            detected = self.wait_detected(fault)
            recovered = self.step_after(detected["time"] if detected else fault.time, RECOVERY_BOUND_S)
            record = {
                **asdict(p),
                "time": fault.time,
                "detected_s": detected["time"] - fault.time if detected else None,
                "recovered_s": recovered["time"] - fault.time if recovered else None,
            }
            injected.append(record)
            print(
                f"[soak] {time.time() - began:7.0f} s  {p.kind:18s} detected in {record['detected_s']} s, "
                f"a step {record['recovered_s']} s after it",
                flush=True,
            )
        while time.time() < end:
            self.keep_driver_up()
            self.last_scrape = scrape(self.run_dir) or self.last_scrape
            time.sleep(1)
        return self.finish(began, injected)

    def wait_detected(self, fault: Fault) -> dict | None:
        deadline = fault.time + RECOVERY_BOUND_S
        while time.time() < deadline:
            found = detections([fault], self.events(), RECOVERY_BOUND_S)[0]
            if found.event is not None:
                return found.event
            self.keep_driver_up()
            time.sleep(0.5)
        return None

    def finish(self, began: float, injected: list[dict]) -> dict:
        """Stop the driver, resume it for a few last steps and the held-out evaluation, check the run."""
        ended = time.time()
        self.scrapes.append(scrape(self.run_dir) or self.last_scrape)
        rc = self.driver.stop()
        steps = len(self.rows())
        self.driver.start(True, "--set", f"train.total_steps={steps + self.args.final_steps}")
        assert self.driver.proc is not None
        final_rc = self.driver.proc.wait(900)
        evaluation = (
            json.loads((self.run_dir / RunDir.EVAL).read_text()) if (self.run_dir / RunDir.EVAL).exists() else {}
        )
        return build_report(
            Outcome(
                seed=self.args.seed,
                minutes=self.args.minutes,
                max_gap_s=self.args.max_gap_s,
                began=began,
                ended=ended,
                injected=injected,
                crashes=self.crashes,
                scrapes=self.scrapes,
                stop_rc=rc,
                final_rc=final_rc,
                sampled_accuracy=evaluation.get("sampled_accuracy_after"),
            ),
            self.logs,
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.driver.exited() is None and self.driver.proc is not None:
                self.driver.proc.kill()
        self.cluster.shutdown()
        with contextlib.suppress(OSError):  # the run's logs outlive the tmpfs
            shutil.copytree(
                self.run_dir,
                self.workdir / "run",
                ignore=shutil.ignore_patterns("weights", "checkpoints"),
                dirs_exist_ok=True,
            )
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.disk)], check=False)


def _mount_tmpfs(path: Path, size_mb: int) -> bool:
    """A size-limited filesystem for the run directory (root and a kernel that allow it), else False."""
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0, help="decides the fault schedule (replay a run with its seed)")
    ap.add_argument("--faults", type=int, default=40, help="faults planned over the run")
    ap.add_argument("--final-steps", type=int, default=8, help="steps of the last resume, before the evaluation")
    ap.add_argument("--max-gap-s", type=float, default=120.0, help="the longest stretch allowed without a step")
    ap.add_argument(
        "--disk-mb",
        type=int,
        default=4096,
        help="size of the run directory's tmpfs (an hour of the job writes ~0.6 GB)",
    )
    ap.add_argument("--workdir", default="/tmp/rlhf-soak")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "soak"))
    ap.add_argument("--kinds", type=lambda s: s.split(","), help="only these fault kinds (comma-separated)")
    ap.add_argument("--plan-only", action="store_true", help="print the seed's schedule and exit")
    args = ap.parse_args()
    if args.plan_only:
        for p in plan(args.seed, args.minutes, args.faults, args.kinds or list(FAULTS)):
            print(asdict(p))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the cluster and the tmpfs are cleaned up
    soak = Soak(args)
    try:
        report = soak.run()
    finally:
        soak.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"soak-seed{args.seed}-{int(args.minutes)}min.json"
    path.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k not in ("injected",)}, indent=1))
    print(f"report: {path}")
    return 0 if report["all_hold"] else 1


if __name__ == "__main__":
    sys.exit(main())
