"""The benchmarks' timing: sides in rotated order over repetitions, and medians of what they timed.

Not a benchmark itself (scripts/run_benchmarks.sh skips modules whose names start with `_`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

T = TypeVar("T")


def rotated(sides: Sequence[T], rep: int) -> tuple[T, ...]:
    """The order of `sides` in repetition `rep` (negative = warmup): rotated by one each repetition.

    With two sides this alternates a-b, b-a, ...; with three, a-b-c, b-c-a, c-a-b, so every side
    takes every position equally often and machine drift hits all of them alike.
    """
    k = rep % len(sides)
    return tuple(sides[k:]) + tuple(sides[:k])


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def time_token_rounds(
    sides: Sequence[str], run: Callable[[str], int], reps: int, warmup: int, show: bool = False
) -> dict[str, list[dict]]:
    """`run(side)`, which returns the tokens it generated, for every side in rotated order (`rotated`):
    `warmup` untimed rounds, then `reps` timed ones. Per side, one row per timed call: rep, position
    in its round, seconds, tokens, tokens/s. `show` prints every call's tokens/s (warmup included)."""
    timings: dict[str, list[dict]] = {side: [] for side in sides}
    for rep in range(-warmup, reps):
        order = rotated(sides, rep)
        for side in order:
            start = time.perf_counter()
            tokens = run(side)
            seconds = time.perf_counter() - start
            if rep >= 0:
                timings[side].append(
                    {
                        "rep": rep,
                        "position": order.index(side),
                        "seconds": seconds,
                        "tokens": tokens,
                        "tokens_per_s": tokens / seconds,
                    }
                )
            if show:
                print(f"rep {rep:2d} {side:5s} {tokens / seconds:8.1f} tokens/s", flush=True)
    return timings


def medians(timings: dict[str, list[dict]], keys: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per side, the median of each of `keys` over its timed rows."""
    return {side: {k: median(row[k] for row in rows) for k in keys} for side, rows in timings.items()}
