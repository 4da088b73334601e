"""Step tracing: wall-clock spans recorded by every process of a job, and the Chrome/Perfetto
trace-event JSON they become. Ray-free.

Each process records into its own `Tracer` (`start` once, at actor setup; `span` wherever work
happens). The driver collects what each actor recorded through the heartbeats it sends anyway
(`drain`), appends the spans to the run's `trace.jsonl`, and `chrome_trace` turns them into the
trace-event format that chrome://tracing and ui.perfetto.dev open: one process per actor kind,
one thread (track) per actor. Wall-clock times (`time.time`) line the processes up; on one
machine they share a clock, across machines they are as close as the nodes' clocks.

`PoolActivity` is the driver's own view of the pools: when each worker had a request in flight,
from which a step's busy share per pool follows at once (spans from the actors arrive later).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

MAX_SPANS = 100_000  # kept per process between two drains; the oldest go first (a stalled driver must not grow us)


class Tracer:
    """The spans one process (one track) recorded since it was last drained."""

    def __init__(self, track: str, kind: str, capacity: int = MAX_SPANS):
        self.track, self.kind = track, kind
        self._spans: deque[tuple[str, float, float, dict | None]] = deque(maxlen=capacity)
        self._lock = threading.Lock()  # heartbeats drain on their own thread while work records

    @contextlib.contextmanager
    def span(self, name: str, **args) -> Iterator[None]:
        """Record `name` from entering to leaving the block (also when it raises)."""
        start = time.time()
        try:
            yield
        finally:
            self.add(name, start, time.time(), **args)

    def add(self, name: str, start: float, end: float, **args) -> None:
        """Record a span whose wall-clock start and end (seconds) are known."""
        with self._lock:
            self._spans.append((name, start, end, args or None))

    def drain(self) -> list[dict]:
        """Every span recorded since the last drain, oldest first, as trace.jsonl rows."""
        with self._lock:
            spans, self._spans = list(self._spans), deque(maxlen=self._spans.maxlen)
        return [
            {
                "track": self.track,
                "kind": self.kind,
                "name": name,
                "start": start,
                "end": end,
                **({"args": args} if args else {}),
            }
            for name, start, end, args in spans
        ]


_tracer: Tracer | None = None


def start(track: str, kind: str) -> Tracer:
    """Make this process's tracer (its actor's name and kind); `span` records into it."""
    global _tracer
    _tracer = Tracer(track, kind)
    return _tracer


def span(name: str, **args):
    """A span of this process's tracer; nothing is recorded where no tracer was started."""
    return _tracer.span(name, **args) if _tracer is not None else contextlib.nullcontext()


def add(name: str, start: float, end: float, **args) -> None:
    """A span with known wall-clock start and end in this process's tracer (if started)."""
    if _tracer is not None:
        _tracer.add(name, start, end, **args)


def drain() -> list[dict]:
    """This process's spans since the last drain (none where no tracer was started)."""
    return _tracer.drain() if _tracer is not None else []


# ---- the driver's view: busy share of each pool --------------------------------------------
class PoolActivity:
    """When each worker of each pool had a request from the driver in flight."""

    def __init__(self) -> None:
        self._open: dict[int, tuple[str, str, float]] = {}  # token -> (pool, worker, start)
        self._closed: list[tuple[str, str, float, float]] = []
        self._tokens = 0

    def begin(self, pool: str, worker: str) -> int:
        self._tokens += 1
        self._open[self._tokens] = (pool, worker, time.time())
        return self._tokens

    def end(self, token: int) -> None:
        pool, worker, start = self._open.pop(token)
        self._closed.append((pool, worker, start, time.time()))

    def busy_shares(self, start: float, end: float, workers: dict[str, int]) -> dict[str, float]:
        """Per pool: the share of [start, end] its workers were busy, averaged over `workers[pool]`
        workers (a worker is busy while at least one request to it is in flight). Intervals that
        ended before `start` are forgotten."""
        now = time.time()
        self._closed = [c for c in self._closed if c[3] > start]
        by_worker: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for pool, worker, a, b in self._closed:
            by_worker.setdefault((pool, worker), []).append((a, b))
        for pool, worker, a in self._open.values():
            by_worker.setdefault((pool, worker), []).append((a, now))
        shares = {}
        for pool, count in workers.items():
            busy = sum(covered(spans, start, end) for (p, _), spans in by_worker.items() if p == pool)
            shares[pool] = busy / ((end - start) * count) if end > start and count else 0.0
        return shares


def covered(intervals: Iterable[tuple[float, float]], start: float, end: float) -> float:
    """Seconds of [start, end] covered by the union of `intervals`."""
    total, reach = 0.0, start
    for a, b in sorted((max(a, start), min(b, end)) for a, b in intervals):
        if b <= reach:
            continue
        total += b - max(a, reach)
        reach = b
    return total


# ---- trace-event JSON -------------------------------------------------------------------
KIND_ORDER = ("driver", "generation", "reward", "reference", "teacher", "judge", "learner", "critic")


def step_window(spans: list[dict], first: int, last: int) -> tuple[float, float] | None:
    """Wall-clock start and end of the driver's `step` spans `first`..`last` (None if absent)."""
    steps = [
        s
        for s in spans
        if s["kind"] == "driver" and s["name"] == "step" and first <= s.get("args", {}).get("step", -1) <= last
    ]
    if not steps:
        return None
    return min(s["start"] for s in steps), max(s["end"] for s in steps)


def chrome_trace(spans: list[dict], window: tuple[float, float] | None = None) -> dict:
    """The spans (overlapping `window`, if given) as a trace-event JSON object: one process per
    actor kind, one thread per actor, complete ("X") events in microseconds from the first span."""
    if window is not None:
        spans = [s for s in spans if s["end"] > window[0] and s["start"] < window[1]]
    if not spans:
        return {"traceEvents": [], "displayTimeUnit": "ms"}
    kinds = sorted(
        {s["kind"] for s in spans}, key=lambda k: (KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER), k)
    )
    pid = {kind: i + 1 for i, kind in enumerate(kinds)}
    spans = sorted(spans, key=lambda s: (s["start"], -s["end"]))
    lane_of = _lanes(spans)
    kind_of = {s["track"]: s["kind"] for s in spans}
    tid: dict[str, int] = {}
    for name in sorted(set(lane_of), key=lambda n: (pid[kind_of[n.split(" (")[0]]], n)):
        tid[name] = len(tid) + 1
    t0 = min(s["start"] for s in spans)
    events: list[dict] = []
    for kind in kinds:
        events.append({"name": "process_name", "ph": "M", "pid": pid[kind], "tid": 0, "args": {"name": kind}})
        events.append(
            {"name": "process_sort_index", "ph": "M", "pid": pid[kind], "tid": 0, "args": {"sort_index": pid[kind]}}
        )
    for name, t in tid.items():
        events.append(
            {
                "name": "thread_name",
                "ph": "M",
                "pid": pid[kind_of[name.split(" (")[0]]],
                "tid": t,
                "args": {"name": name},
            }
        )
    for s, lane_name in zip(spans, lane_of):
        events.append(
            {
                "name": s["name"],
                "cat": s["kind"],
                "ph": "X",
                "pid": pid[s["kind"]],
                "tid": tid[lane_name],
                "ts": round((s["start"] - t0) * 1e6, 1),
                "dur": round(max(0.0, s["end"] - s["start"]) * 1e6, 1),
                "args": s.get("args", {}),
            }
        )
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"t0_unix_s": t0}}


def _lanes(spans: list[dict]) -> list[str]:
    """The thread each span (sorted by start, longest first) is drawn on: its track's name, or
    "track (k)" for its k-th lane. Spans of one actor may overlap without nesting (concurrent
    requests to an engine); the trace-event format wants a thread's complete events nested, so
    those go to extra lanes."""
    lanes: dict[str, list[list[float]]] = {}  # track -> per lane, the ends of its open spans (a stack)
    lane_of: list[str] = []
    for s in spans:
        stacks = lanes.setdefault(s["track"], [])
        for lane, stack in enumerate(stacks):  # noqa: B007 - `lane` is read after the loop (the break keeps it)
            while stack and stack[-1] <= s["start"]:
                stack.pop()
            if not stack or s["end"] <= stack[-1]:
                break
        else:
            lane, stack = len(stacks), []
            stacks.append(stack)
        stack.append(s["end"])
        lane_of.append(s["track"] if lane == 0 else f"{s['track']} ({lane + 1})")
    return lane_of


def read_spans(path: Path) -> list[dict]:
    """The spans of a run's trace.jsonl."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no trace (is this a run directory, of a job with metrics.trace on?)")
    from rlhf_cluster.fileio import read_jsonl

    return read_jsonl(path).rows  # a torn final line (a crash mid-append) is left out


def parse_steps(text: str | None) -> tuple[int, int] | None:
    """`A:B` (steps A to B, both included), `A` (one step) or None (all)."""
    if not text:
        return None
    first, _, last = text.partition(":")
    try:
        window = int(first), int(last or first)
    except ValueError:
        raise ValueError(f"--steps {text!r}: expected A:B or A (step numbers)") from None
    if window[0] > window[1]:
        raise ValueError(f"--steps {text!r}: the first step is after the last")
    return window


def write_trace(spans: list[dict], out: Path, steps: tuple[int, int] | None = None) -> Path:
    """The Chrome/Perfetto trace JSON of `spans` (those overlapping `steps`, if given) at `out`. An
    `out` that cannot be written is refused naming it (and a missing folder, that folder): a
    FileNotFoundError or ValueError of one line, no `[Errno N]`."""
    from rlhf_cluster.fileio import output_path  # the check `plot --out` makes

    out = output_path(out)
    window = None
    if steps is not None:
        window = step_window(spans, *steps)
        if window is None:
            raise ValueError(f"steps {steps[0]}..{steps[1]}: the trace has no such step")
    try:
        out.write_text(json.dumps(chrome_trace(spans, window)))
    except OSError as exc:  # a folder at `out`, no permission, a full disk
        raise ValueError(f"cannot write {out}: {exc.strerror or exc}") from exc
    return out
