"""The soak's report (issue 58): from what the soak saw (its faults, the driver's
exits, the scrapes) and the run directory alone, the faults by kind with detection and recovery
times, steps per minute inside and outside recovery windows, every invariant of
rlhf_cluster/run/invariants.py, the pools' sizes over time (`benchmarks.soak.pools`), and the checks
that decide whether the hour passed."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

from benchmarks.common import machine_info
from benchmarks.soak.plan import FAULTS, RECOVERY_BOUND_S
from benchmarks.soak.pools import oscillating, pool_report
from rlhf_cluster.run.invariants import Fault, check_run, detections
from rlhf_cluster.run.run_dir import RunDir

DEMO_SAMPLED_AFTER = (0.389, 0.532)  # docs/demo-results.md: sampled held-out accuracy after RL, seeds 0-4
# What the final accuracy is held to. Not the demo's range above: that is after the demo's 240 steps, and
# this job trains ~14,000 steps in the hour, at a tenth of the demo's learning rate (job.SOAK_LR).
# What faults could do is undo the learning (wrong or damaged weights served or trained from): a placebo
# reward lowers it by 0.10-0.21 and a random teacher to 0 (docs/demo-results.md). So: the job's own start
# (the warm-up at seed 0, the soak's job seed) plus test_demo_learns' margin for "it learned".
START_SAMPLED = 0.205  # docs/demo-results.md: seed 0, sampled held-out accuracy before RL
LEARNED_MARGIN = 0.05  # tests/integration/test_demo_learns.py: the smallest sampled gain it accepts


@dataclass(frozen=True)
class Outcome:
    """What the soak itself saw of the run."""

    seed: int
    minutes: float
    max_gap_s: float
    began: float  # wall time of the first step, when the schedule starts
    ended: float  # wall time the faults' run ended (before the final resume)
    injected: list[dict]  # a Planned's fields with the fault's time, detected_s, recovered_s
    crashes: list[dict]  # the driver's exits the soak did not ask for
    scrapes: list[dict]  # the last Prometheus scrape of each driver's life
    stop_rc: int  # the driver's exit code at the end of the run
    final_rc: int  # the final resume's (its last steps and the held-out evaluation)
    sampled_accuracy: float | None  # the final evaluation's sampled held-out accuracy


def build_report(o: Outcome, run: RunDir) -> dict:
    rows = run.read(RunDir.METRICS)
    events = run.read(RunDir.EVENTS)
    faults = [Fault(f["time"], f["kind"], FAULTS[f["kind"]][1], FAULTS[f["kind"]][0]) for f in o.injected]
    found = detections(faults, events, RECOVERY_BOUND_S)
    invariants = check_run(run, max_staleness=1, max_gap_s=o.max_gap_s)
    windows = [(f["time"], f["time"] + (f["recovered_s"] or RECOVERY_BOUND_S)) for f in o.injected]
    times = [r["time"] for r in rows if o.began <= r.get("time", 0) <= o.ended]
    in_fault = sum(any(a <= t <= b for a, b in windows) for t in times)
    fault_s = sum(b - a for a, b in windows)
    report = {
        "seed": o.seed,
        "minutes": o.minutes,
        "machine": machine_info(),
        "faults": len(o.injected),
        "kinds": len({f["kind"] for f in o.injected}),
        "by_kind": by_kind(o.injected),
        "injected": o.injected,
        "undetected": [asdict(d.fault) for d in found if d.event is None],
        "steps": len(times),
        "steps_per_min_in_faults": in_fault / fault_s * 60 if fault_s else None,
        "steps_per_min_otherwise": (len(times) - in_fault) / max(1e-9, o.ended - o.began - fault_s) * 60,
        "last_step_to_end_s": o.ended - max(times, default=o.began),
        "driver_crashes": o.crashes,
        "stop_rc": o.stop_rc,
        "final_rc": o.final_rc,
        "fingerprint_mismatches": sum(s.get("rlhf_weights_fingerprint_mismatches_total", 0) for s in o.scrapes),
        "worker_restarts_scraped": sum(s.get("rlhf_pool_worker_restarts_total", 0) for s in o.scrapes),
        "sampled_accuracy_after": o.sampled_accuracy,
        "held_out_by_step": held_out_by_step(rows),
        "demo_sampled_after": DEMO_SAMPLED_AFTER,
        "start_sampled": START_SAMPLED,
        "pools": pool_report(events, o.began, o.ended),
        "invariants": {i.name: {"holds": i.holds, "detail": i.detail, "value": i.value} for i in invariants.invariants},
    }
    checks = {
        **{name: v["holds"] for name, v in report["invariants"].items()},
        "every_fault_detected": not report["undetected"],
        "steps_until_the_end": report["last_step_to_end_s"] <= o.max_gap_s,
        "every_fault_recovered": all(f["recovered_s"] is not None for f in o.injected),
        "no_fingerprint_mismatch": report["fingerprint_mismatches"] == 0,
        "driver_never_crashed": not o.crashes and o.stop_rc == 0 and o.final_rc == 0,
        "still_learned": learned(o.sampled_accuracy),
        # No pool resized more than 4 times in any 10 minutes (issue 73's N and M; pools.OSCILLATION_*).
        "no_pool_oscillates": not oscillating(report["pools"]),
    }
    report["checks"] = checks
    report["all_hold"] = all(checks.values())
    return report


def learned(sampled: float | None) -> bool:
    """Whether the final sampled held-out accuracy keeps what RL learned: the start plus the margin."""
    return sampled is not None and sampled >= START_SAMPLED + LEARNED_MARGIN


def held_out_by_step(rows: list[dict]) -> list[dict]:
    """The job's periodic held-out evaluations (`data.eval_every_steps`) over the hour: the step,
    the sampled and the greedy accuracy; of a step trained twice (a resume goes back), its last row."""
    by_step = {r["step"]: r for r in rows if "eval_sampled_accuracy" in r}
    return [
        {"step": s, "sampled": by_step[s]["eval_sampled_accuracy"], "greedy": by_step[s].get("eval_accuracy")}
        for s in sorted(by_step)
    ]


def by_kind(injected: list[dict]) -> dict[str, dict]:
    """Per fault kind: how many, how many went undetected or unrecovered, detection and recovery
    times (median, max; seconds from the fault)."""
    out: dict[str, dict] = {}
    for kind in sorted({f["kind"] for f in injected}):
        of = [f for f in injected if f["kind"] == kind]
        detected = [f["detected_s"] for f in of if f["detected_s"] is not None]
        recovered = [f["recovered_s"] for f in of if f["recovered_s"] is not None]
        out[kind] = {
            "count": len(of),
            "undetected": len(of) - len(detected),
            "unrecovered": len(of) - len(recovered),
            **_spread("detected_s", detected),
            **_spread("recovered_s", recovered),
        }
    return out


def _spread(name: str, values: list[float]) -> dict:
    return {f"{name}_median": statistics.median(values) if values else None, f"{name}_max": max(values, default=None)}
