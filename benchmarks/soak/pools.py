"""The pools' sizes over a soak (issue 73), from events.jsonl alone: each pool's size at every start
(`pools_started`: the job's and each resume's), every resize (`scaled`, the operator's or the
autoscaler's, with the autoscaler's reason from its `autoscaled` row), every failed resize, every
release of a pin (`scale --auto`), and every replaced worker (`worker_replaced`, and whether a warm
spare stood in); the resizes per pool, and the check that no pool oscillates.

Oscillation (issue 73's "no pool resized more than N times in M minutes"): at most
`OSCILLATION_RESIZES` (N = 4) resizes of a pool, by anyone, in any `OSCILLATION_WINDOW_S` (M = 10
minutes). A start or a resume is not a resize (a resumed job starts at its configured sizes), nor
is a replacement. Why not the autoscaling benchmark's N = 2 in four cooldowns: that bounds the
autoscaler alone, and the soak also resizes generation by hand (`scale_generation`) and resumes
the job, which starts the autoscaler's memory afresh; with the soak's 90 s cooldown (270 s for a
reversal) the autoscaler alone makes at most 4 changes in 10 minutes between bounds two apart
(tests/unit/test_soak_pool_sizes.py), where a pool changed every cooldown (up, down, up: the reversal
rule broken) makes 7.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

OSCILLATION_RESIZES = 4  # N: resizes of one pool...
OSCILLATION_WINDOW_S = 600.0  # ...in any M = 10 minutes (the autoscaling benchmark's rule)


@dataclass(frozen=True)
class PoolChange:
    """One row of the pools' table: a pool's size from `t_s` on, and what made it so."""

    t_s: float  # seconds from the schedule's start (the first step); a start before it is negative
    pool: str
    size: int | None  # workers in rotation (spares not counted); None where no earlier row said
    source: str  # start, resume, manual, auto, auto_failed, released, replaced
    detail: str = ""  # the autoscaler's reason, a failure's error, the worker replaced and by what


def timeline(events: list[dict], began: float) -> list[PoolChange]:
    """The pools' table from events.jsonl's rows, in their order."""
    sizes: dict[str, int | None] = {}
    out: list[PoolChange] = []
    starts = 0
    for e in events:
        kind, t, pool = e.get("event"), e.get("time", began) - began, str(e.get("pool"))
        if kind == "pools_started":
            starts += 1
            for name, n in e.get("sizes", {}).items():
                sizes[name] = n
                mode = "auto" if name in e.get("auto", ()) else "fixed"
                out.append(PoolChange(t, name, n, "start" if starts == 1 else "resume", mode))
        elif kind == "scaled":
            sizes[pool] = e.get("replicas")
            out.append(PoolChange(t, pool, sizes[pool], e.get("source", "manual")))
        elif kind == "autoscaled":
            # Written just after its resize's `scaled` row (source auto): the reason goes there.
            at = next((i for i in range(len(out) - 1, -1, -1) if out[i].pool == pool and out[i].source == "auto"), None)
            if at is not None and not out[at].detail:
                out[at] = replace(out[at], detail=str(e.get("reason", "")))
        elif kind == "autoscale_failed":
            out.append(PoolChange(t, pool, sizes.get(pool), "auto_failed", f"to {e.get('to')}: {e.get('error')}"))
        elif kind == "scale_released":
            out.append(PoolChange(t, pool, sizes.get(pool), "released", "back to the autoscaler (scale --auto)"))
        elif kind == "worker_replaced":
            out.append(PoolChange(t, pool, sizes.get(pool), "replaced", _replaced(e)))
    return out


def _replaced(e: dict) -> str:
    spare = e.get("spare")  # absent before warm spares (issue 73)
    by = "" if spare is None else " (a warm spare)" if spare else " (a new worker)"
    return f"{e.get('worker')} -> {e.get('replacement')}{by}"


RESIZES = ("manual", "auto")  # the sources of a `scaled` row


def most_in_window(times: list[float], window_s: float) -> int:
    """The most of `times` (seconds) that lie in any span of `window_s` (ends included)."""
    times = sorted(times)
    most, first = 0, 0
    for last, t in enumerate(times):
        while t - times[first] > window_s:
            first += 1
        most = max(most, last - first + 1)
    return most


def seconds_at_size(changes: list[PoolChange], began: float, ended: float) -> dict[str, float]:
    """Seconds of [0, ended - began] (the schedule's clock) the pool spent at each size, from its
    rows (`changes`, one pool's, in order); the size before its first row counts from its first."""
    out: dict[str, float] = {}
    sized = [c for c in changes if c.size is not None]
    for i, c in enumerate(sized):
        start = max(0.0, c.t_s)
        end = min(ended - began, sized[i + 1].t_s if i + 1 < len(sized) else ended - began)
        if end > start:
            out[str(c.size)] = out.get(str(c.size), 0.0) + end - start
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def by_pool(changes: list[PoolChange], began: float, ended: float) -> dict[str, dict]:
    """Per pool: its resizes (by source), the most in any oscillation window, its smallest, largest
    and last size, seconds at each size, and its replacements (and how many a spare stood in for)."""
    out: dict[str, dict] = {}
    for pool in sorted({c.pool for c in changes}):
        of = [c for c in changes if c.pool == pool]
        resizes = [c for c in of if c.source in RESIZES]
        replaced = [c for c in of if c.source == "replaced"]
        sizes = [c.size for c in of if c.size is not None]
        out[pool] = {
            "resizes": len(resizes),
            "resizes_by_source": {s: sum(c.source == s for c in resizes) for s in RESIZES},
            "most_resizes_in_window": most_in_window([c.t_s for c in resizes], OSCILLATION_WINDOW_S),
            "failed_resizes": sum(c.source == "auto_failed" for c in of),
            "min_size": min(sizes, default=None),
            "max_size": max(sizes, default=None),
            "last_size": sizes[-1] if sizes else None,
            "seconds_at_size": seconds_at_size(of, began, ended),
            "replaced": len(replaced),
            "replaced_by_spare": sum(c.detail.endswith("(a warm spare)") for c in replaced),
        }
    return out


def pool_report(events: list[dict], began: float, ended: float) -> dict:
    """The report's `pools`: the table (`timeline`, as dicts), the summary per pool, and the rule."""
    changes = timeline(events, began)
    return {
        "oscillation_rule": {"resizes": OSCILLATION_RESIZES, "window_s": OSCILLATION_WINDOW_S},
        "by_pool": by_pool(changes, began, ended),
        "timeline": [asdict(c) for c in changes],
    }


def oscillating(pools: dict) -> list[str]:
    """The pools of a `pool_report` resized more than the rule allows in some window."""
    return [p for p, v in pools["by_pool"].items() if v["most_resizes_in_window"] > OSCILLATION_RESIZES]


def current_sizes(events: list[dict]) -> dict[str, int]:
    """Each pool's size now, by its last row (the newest start, then every resize)."""
    sizes: dict[str, int] = {}
    for c in timeline(events, 0.0):
        if c.size is not None:
            sizes[c.pool] = c.size
    return sizes


def format_table(pools: dict) -> list[str]:
    """The pools' table and summary as text lines, for the soak's printout."""
    lines = ["pools over time (s from the first step; size = workers in rotation):"]
    for c in pools["timeline"]:
        size = "?" if c["size"] is None else c["size"]
        lines.append(f"  {c['t_s']:8.1f}  {c['pool']:10s} {size!s:>3}  {c['source']:11s} {c['detail']}".rstrip())
    rule = pools["oscillation_rule"]
    lines.append(f"per pool (oscillation rule: at most {rule['resizes']} resizes in any {rule['window_s']:g} s):")
    for pool, v in pools["by_pool"].items():
        at = ", ".join(f"{size}: {s:.0f} s" for size, s in v["seconds_at_size"].items())
        lines.append(
            f"  {pool}: {v['resizes']} resizes ({v['resizes_by_source']['manual']} manual, "
            f"{v['resizes_by_source']['auto']} auto; at most {v['most_resizes_in_window']} in a window), "
            f"sizes {v['min_size']}..{v['max_size']} (last {v['last_size']}; {at}), "
            f"{v['replaced']} replaced ({v['replaced_by_spare']} by a spare)"
        )
    return lines
