"""What must hold of a run however it was interrupted, read from its run directory alone: the
checks a soak run (issue 58) asserts after faults, and any test after a kill and resume.

- `trained_once`: no sample id in `consumed.jsonl` twice (no sample used twice, across resumes);
- `groups_once`: no prompt group logged twice as scored (`scored/`: nothing generated and scored
  again after a resume that kept it);
- `steps_contiguous`: `metrics.jsonl` holds steps 0..n-1, once each, in order;
- `staleness`: no step trained on a sample staler than `train.max_staleness` (its row's
  `staleness_max`);
- `longest_gap_s`: the longest wall-clock stretch between two steps' rows (a resume's downtime
  included): the soak bounds it;
- `served_proven`: every policy version a trained sample was generated with (above 0, the job's
  starting model) was loaded by that worker with a proven receipt (`receipts.jsonl`: the
  fingerprint it reported is the sender's, or the store's manifest for a load from the store).
  Worker names restart with each driver, so the proof is by (worker name, version); a sample of a
  group a resume reused from the scored log (worker `recovered`, or `?`) has no live worker: some
  proven load of its version stands for it.

`detections` matches injected faults to the recoveries the run recorded (`events.jsonl`).

`check_run` returns every invariant with whether it holds and what broke it; nothing here
raises on a broken run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.run.scored_log import ScoredLog

UNKNOWN_WORKERS = ("recovered", "?")  # what consumed.jsonl names when no live worker generated a sample


@dataclass
class Invariant:
    name: str
    holds: bool
    detail: str = ""
    value: float | None = None


@dataclass
class RunInvariants:
    invariants: list[Invariant] = field(default_factory=list)

    @property
    def hold(self) -> bool:
        return all(i.holds for i in self.invariants)

    def broken(self) -> list[Invariant]:
        return [i for i in self.invariants if not i.holds]

    def __getitem__(self, name: str) -> Invariant:
        return next(i for i in self.invariants if i.name == name)


def check_run(run_dir: RunDir, max_staleness: int, max_gap_s: float | None = None) -> RunInvariants:
    """The invariants of the run in `run_dir` (its job's `train.max_staleness`; `max_gap_s`: the
    longest stretch between steps allowed, None: reported only)."""
    rows = run_dir.read(RunDir.METRICS)
    consumed = run_dir.read(RunDir.CONSUMED)
    out = RunInvariants()

    twice = [sid for sid, n in Counter(r["sample_id"] for r in consumed).items() if n > 1]
    out.invariants.append(Invariant("trained_once", not twice, f"trained more than once: {twice[:5]}" if twice else ""))

    logged = ScoredLog(run_dir / RunDir.SCORED_LOG).since(0) if (run_dir / RunDir.SCORED_LOG).is_dir() else []
    groups = Counter(samples[0].group_id for _, samples in logged if samples)
    again = [g for g, n in groups.items() if n > 1]
    out.invariants.append(Invariant("groups_once", not again, f"scored more than once: {again[:5]}" if again else ""))

    steps = [r["step"] for r in rows]
    contiguous = steps == list(range(len(steps)))
    out.invariants.append(
        Invariant("steps_contiguous", contiguous, "" if contiguous else f"steps {steps[:10]}...", float(len(steps)))
    )

    stale = [(r["step"], r["staleness_max"]) for r in rows if r.get("staleness_max", 0) > max_staleness]
    out.invariants.append(
        Invariant(
            "staleness",
            not stale,
            f"steps above max_staleness={max_staleness}: {stale[:5]}" if stale else "",
            float(max((r.get("staleness_max", 0) for r in rows), default=0)),
        )
    )

    proven = {(r["worker"], r["version"]) for r in run_dir.read(RunDir.RECEIPTS) if r.get("proven")}
    # A group a resume reused from the scored log ("recovered") or of no recorded worker ("?"): any
    # proven load of its version stands for it.
    proven |= {(unknown, version) for _, version in proven for unknown in UNKNOWN_WORKERS}
    unproven = sorted(
        {
            (c["worker"], int(version))
            for c in consumed
            for _, version in c.get("policy_versions") or [(0, c["policy_version"])]
            if version > 0 and (c["worker"], int(version)) not in proven
        }
    )
    out.invariants.append(
        Invariant(
            "served_proven",
            not unproven,
            f"generated with versions no proven receipt shows: {unproven[:5]}" if unproven else "",
            float(len(proven)),
        )
    )

    times = [r["time"] for r in rows if "time" in r]
    gap = max((b - a for a, b in zip(times, times[1:])), default=0.0)
    holds = max_gap_s is None or gap <= max_gap_s
    out.invariants.append(
        Invariant("longest_gap_s", holds, "" if holds else f"{gap:.1f} s between two steps > {max_gap_s:g} s", gap)
    )
    return out


@dataclass(frozen=True)
class Fault:
    """An injected fault: when (wall clock), what, and the events.jsonl kinds (and pool, if any)
    that count as its detection."""

    time: float
    kind: str
    detected_by: tuple[str, ...]
    pool: str | None = None


@dataclass(frozen=True)
class Detection:
    fault: Fault
    event: dict | None  # the first matching event after the fault, None: not detected within the bound
    seconds: float | None


def detections(faults: list[Fault], events: list[dict], bound_s: float) -> list[Detection]:
    """Each fault's detection: the first event of a kind in its `detected_by` (of its pool, where
    the event names one) from the fault's time to `bound_s` later, not already claimed by an
    earlier fault."""
    claimed: set[int] = set()
    out = []
    for fault in sorted(faults, key=lambda f: f.time):
        match = next(
            (
                (i, e)
                for i, e in enumerate(events)
                if i not in claimed
                and e.get("event") in fault.detected_by
                and (fault.pool is None or e.get("pool", fault.pool) == fault.pool)
                and fault.time <= e.get("time", -1.0) <= fault.time + bound_s
            ),
            None,
        )
        if match is None:
            out.append(Detection(fault, None, None))
            continue
        claimed.add(match[0])
        out.append(Detection(fault, match[1], match[1]["time"] - fault.time))
    return out
