"""The reward function of `benchmarks.autoscaling`'s jobs (`benchmarks._autoscaling_reward:arithmetic`):
the arithmetic verifier, after sleeping the seconds per sample that a control file says.

The file is named by $AUTOSCALING_BENCH_DELAY and holds one number, the sleep per sample; the
benchmark writes it before a job starts and rewrites it (x4) once the job is halfway. Every reward
worker reads it (at most every `REREAD_S`), so the slowdown reaches every worker within 50 ms, those
the autoscaler starts later included. No variable or no file: no sleep.

Not a benchmark itself (scripts/run_benchmarks.sh skips modules whose names start with `_`); it
imports nothing heavy, since each reward worker imports it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from rlhf_cluster.data.tasks import verify_arithmetic

ENV = "AUTOSCALING_BENCH_DELAY"


def set_delay(path: Path, seconds: float) -> None:
    """Make every reward worker sleep `seconds` per sample from its next call on (written whole:
    a worker never reads a half-written file)."""
    part = path.with_suffix(".part")
    part.write_text(repr(float(seconds)))
    os.replace(part, path)


def read_delay() -> float:
    """The seconds per sample the control file says now (0 without one, or one that does not read as a number)."""
    path = os.environ.get(ENV)
    if not path:
        return 0.0
    try:
        return max(0.0, float(Path(path).read_text()))
    except (OSError, ValueError):
        return 0.0


REREAD_S = 0.05  # the file is read at most this often per worker: a switch reaches every worker within it
_last = [0.0, float("-inf")]  # the delay last read, and when (time.monotonic)


def delay() -> float:
    """`read_delay()`, read again once `REREAD_S` has passed since the last read (a read per sample
    would add its own cost to every sample, the overhead the sleep is measured against)."""
    now = time.monotonic()
    if now - _last[1] >= REREAD_S:
        _last[:] = [read_delay(), now]
    return _last[0]


def arithmetic(response: str, answer: str) -> dict[str, float]:
    """The verifier's reward, `delay()` seconds later."""
    seconds = delay()
    if seconds:
        time.sleep(seconds)
    return verify_arithmetic(response, answer)
