"""The soak's run: a Ray cluster of two raylets on this machine, the job's driver on it, the seed's
faults injected in schedule (each once the one before has recovered), every fault's detection
and recovery timed, then the final resume and the report (`benchmarks.soak.report`).

With the autoscaler on (the default), the `scale_generation` fault is an operator's resize: it pins
the generation pool one worker up or down within the autoscaler's bounds, and once it is applied
hands the pool back (`scale --auto`), so both the manual path and the autoscaler's run."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.common import REPO
from benchmarks.soak.driver import CLI, Driver, actor_pids, scrape, serving_pids
from benchmarks.soak.job import AUTOSCALE, GENERATION_REPLICAS, gen_slots, job_config
from benchmarks.soak.plan import CLASS_OF, FAULTS, RECOVERY_BOUND_S, Planned, plan
from benchmarks.soak.pools import current_sizes
from benchmarks.soak.report import Outcome, build_report
from rlhf_cluster.fileio import CorruptLogError
from rlhf_cluster.run.invariants import Fault, detections
from rlhf_cluster.run.run_dir import RunDir


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
        # The job's processes import the soak's reward function (benchmarks.soak.reward) from this checkout.
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 16, "include_dashboard": False})
        # Older callers' namespaces lack the options of issue 73: the job as it was then.
        self.autoscale, self.spares = getattr(args, "autoscale", False), getattr(args, "spares", 0)
        self.gen_node = self.add_gen_node()
        self.cluster.wait_for_nodes()
        config = job_config(self.workdir, self.run_dir, autoscale=self.autoscale, spares=self.spares)
        self.driver = Driver(config, self.cluster.address, self.workdir)
        self.scrapes: list[dict] = []  # the last scrape of each driver's life
        self.last_scrape: dict[str, float] = {}
        self.crashes: list[dict] = []  # the driver's exits the soak did not ask for

    def add_gen_node(self):
        """The raylet of the generation workers and their spares (`soak_gen` slots), the one the soak
        kills and restarts."""
        return self.cluster.add_node(num_cpus=4, resources={"soak_gen": gen_slots(self.spares)})

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
        """The planned fault, injected now (None where it has nothing to hit: no live worker of its pool,
        no size-limited disk)."""
        pool, detected_by = FAULTS[p.kind]
        if p.kind.startswith(("kill_", "stop_")):
            at = self._kill_or_stop(p, pool)
        else:
            at = {
                "push_interrupted": self._push_interrupted,
                "raylet_restart": self._raylet_restart,
                "driver_sigterm": self._driver_sigterm,
                "reward_failing": self._reward_fault,
                "reward_hanging": self._reward_fault,
                "disk_full": self._disk_full,
                "scale_generation": self._scale_generation,
            }[p.kind](p)
        return None if at is None else Fault(at, p.kind, detected_by, pool)

    # Each of these injects its kind of fault and returns when it began (None: nothing to hit).
    def _kill_or_stop(self, p: Planned, pool: str | None) -> float | None:
        """SIGKILL or SIGSTOP one worker of the pool (no pool: one learner rank)."""
        now = time.time()
        pids = self.targets(pool)
        if not pids:
            return None
        os.kill(pids[p.pick % len(pids)], signal.SIGKILL if p.kind.startswith("kill") else signal.SIGSTOP)
        return now

    def _push_interrupted(self, p: Planned) -> float | None:
        """An engine killed as a step's version goes out to the engines."""
        now = time.time()
        seen = len(self.rows())
        while len(self.rows()) <= seen and time.time() < now + 60:
            time.sleep(0.005)
        pids = self.targets("generation")
        if not pids:
            return None
        now = time.time()
        os.kill(pids[p.pick % len(pids)], signal.SIGKILL)
        return now

    def _raylet_restart(self, p: Planned) -> float | None:
        now = time.time()
        self.cluster.remove_node(self.gen_node)
        time.sleep(p.hold_s)
        self.gen_node = self.add_gen_node()
        return now

    def _driver_sigterm(self, p: Planned) -> float | None:
        now = time.time()
        self.scrapes.append(scrape(self.run_dir) or self.last_scrape)
        self.last_scrape = {}
        rc = self.driver.stop()
        if rc != 0:
            self.crashes.append({"time": time.time(), "rc": rc, "log": f"driver-{self.driver.starts}.log"})
        self.driver.start(resume=True)
        return now

    def _reward_fault(self, p: Planned) -> float | None:
        """The reward function fails (`reward_failing`) or hangs (`reward_hanging`) for `hold_s`."""
        now = time.time()
        self.mode_file.write_text("fail" if p.kind == "reward_failing" else "hang")
        time.sleep(p.hold_s)
        self.mode_file.write_text("ok")
        return now

    def _disk_full(self, p: Planned) -> float | None:
        if not self.tmpfs:
            return None
        now = time.time()
        ballast = self.disk / "ballast"
        with open(ballast, "wb") as fh, contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * (1 << 20))
                fh.flush()
        time.sleep(p.hold_s)
        ballast.unlink()
        return now

    def _scale_generation(self, p: Planned) -> float | None:
        """The generation pool resized by hand, one worker up (down at its largest); with the
        autoscaler on, within its bounds, and handed back to it once applied (`scale --auto`)."""
        now = time.time()
        low, high = (GENERATION_REPLICAS, GENERATION_REPLICAS + 1)
        if self.autoscale:
            low, high = AUTOSCALE["generation"]["min_replicas"], AUTOSCALE["generation"]["max_replicas"]
        size = current_sizes(self.events()).get("generation", GENERATION_REPLICAS)
        self.scale("--replicas", str(size + 1 if size < high else max(low, size - 1)))
        if self.autoscale:
            self.scale("--auto")
        return now

    def scale(self, *how: str) -> None:
        command = [CLI, "scale", "soak", "--pool", "generation", *how, "--address", self.cluster.address]
        subprocess.run(command, check=True, capture_output=True, timeout=300)

    def raylet_pids(self) -> set[int]:
        """The pids of this soak's raylets (its worker processes are their children)."""
        return {
            info.process.pid
            for node in self.cluster.list_all_nodes()
            for info in node.all_processes.get("raylet", [])
            if info.process.poll() is None
        }

    def targets(self, pool: str | None) -> list[int]:
        """The processes a fault of `pool` may hit (None: the learner's ranks). Of generation, the
        workers in rotation: a warm spare's loss is made good without an events.jsonl row to detect it
        by (where the workers in rotation cannot be told, every generation worker)."""
        pids = actor_pids("LearnerRank" if pool is None else CLASS_OF[pool], self.raylet_pids())
        if pool != "generation" or not self.spares:
            return pids
        serving = serving_pids(self.run_dir, "generation", "rlhf_generation_tokens_total")
        print(f"[soak] generation: {len(pids)} processes, in rotation {serving or 'not told: all'}", flush=True)
        return [pid for pid in pids if pid in (serving or pids)]

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
            self.idle_until(min(planned_at, end))
            if time.time() >= end:
                break
            record = self.one_fault(p, began)
            if record is not None:
                injected.append(record)
        self.idle_until(end)
        return self.finish(began, injected)

    def idle_until(self, t: float) -> None:
        """Until wall time `t`: the driver kept up, its counters scraped."""
        while time.time() < t:
            self.keep_driver_up()
            self.last_scrape = scrape(self.run_dir) or self.last_scrape
            time.sleep(1)

    def one_fault(self, p: Planned, began: float) -> dict | None:
        """The planned fault injected, its detection and the first step after it waited for: its record
        (None where it had nothing to hit)."""
        fault = self.inject(p)
        if fault is None:
            print(f"[soak] {p.kind}: nothing to hit, skipped", flush=True)
            return None
        detected = self.wait_detected(fault)
        recovered = self.step_after(detected["time"] if detected else fault.time, RECOVERY_BOUND_S)
        record = {
            **asdict(p),
            "time": fault.time,
            "detected_s": detected["time"] - fault.time if detected else None,
            "recovered_s": recovered["time"] - fault.time if recovered else None,
        }
        print(
            f"[soak] {time.time() - began:7.0f} s  {p.kind:18s} detected in {record['detected_s']} s, "
            f"a step {record['recovered_s']} s after it",
            flush=True,
        )
        return record

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
