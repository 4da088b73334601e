"""Import what a config names as `module:attribute` (reward functions, environments, tool-call
parsers), with errors that name the config field and what went wrong; and judge how often such
code fails (`FailureRate`). Ray-free."""

from __future__ import annotations

import importlib
import logging
from collections import deque

log = logging.getLogger(__name__)


def import_spec(spec: str, field: str, kind: str = "function", example: str = "my_rewards:score") -> object:
    """The object `module:attribute` names (the attribute may be dotted, e.g. `module:Class.method`).

    Errors are ValueErrors that name the config field, the spec and what went wrong.
    """
    module_name, sep, attr = spec.strip().partition(":")
    where = f"{field}={spec!r}"
    if not sep or not all(part.isidentifier() for part in f"{module_name}.{attr}".split(".")):
        raise ValueError(f"{where} must look like 'module:{kind}', e.g. '{example}'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ValueError(
                f"{where}: module {module_name!r} not found (it must be importable on every worker that uses it: "
                "on sys.path / PYTHONPATH, or shipped with the job's working_dir)"
            ) from exc
        raise ValueError(f"{where}: importing module {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # the user's module itself is broken (SyntaxError is an Exception too)
        raise ValueError(f"{where}: importing module {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    found = module
    for part in attr.split("."):
        if not hasattr(found, part):
            raise ValueError(f"{where}: module {module_name!r} has no attribute {attr!r}")
        found = getattr(found, part)
    return found


class FailureRate:
    """A user function's recent calls (a reward function's, an agent's): it counts as broken when
    its first `in_a_row` calls all fail (it never worked), or once more than `max_fraction` of a
    full `window` of calls failed (a few early failures are noise); past half of that a warning is
    logged, once per crossing. A function that has worked and then fails for a while (a verifier's
    service down) is judged by the rate alone: `max_fraction` 1 rides out any outage. `failed`
    returns why it is broken, or None."""

    def __init__(self, where: str, max_fraction: float, window: int, in_a_row: int):
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_failure_fraction={max_fraction}: expected a fraction in [0, 1]")
        if window < 1:
            raise ValueError(f"failure_window={window}: expected at least 1 sample")
        self.where, self.max_fraction, self.limit_in_a_row = where, max_fraction, in_a_row
        self.recent: deque[bool] = deque(maxlen=window)  # True: that call failed
        self.in_a_row = 0
        self.worked = False  # a call has succeeded
        self.warned = False

    def ok(self) -> None:
        self.in_a_row = 0
        self.worked = True
        self.recent.append(False)

    def failed(self, cause: str, samples: int = 1) -> str | None:
        """One failed call (of `samples` samples: a batch call's; each counts in the window)."""
        self.in_a_row += 1
        self.recent.extend([True] * samples)
        if self.in_a_row >= self.limit_in_a_row and not self.worked:
            return f"{self.where} failed on {self.in_a_row} samples in a row; the last: {cause}"
        window = self.recent.maxlen or 1
        if len(self.recent) < window:
            return None
        rate = sum(self.recent) / window
        if rate > self.max_fraction:
            return (
                f"{self.where} failed on {sum(self.recent)} of its last {window} samples ({rate:.0%}, more than "
                f"max_failure_fraction {self.max_fraction:g}); the last: {cause}"
            )
        if rate > self.max_fraction / 2 and not self.warned:
            log.warning(
                "%s fails on %.0f%% of its last %d samples (stops the job above %.0f%%); the last: %s",
                self.where,
                100 * rate,
                window,
                100 * self.max_fraction,
                cause,
            )
        self.warned = rate > self.max_fraction / 2
        return None
