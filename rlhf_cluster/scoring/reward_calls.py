"""How a user's reward function is called and its value read: on a thread of its own, abandoned
at its timeout (`call_with_timeout`), an `async def` function's coroutine run to its end
(`awaited`), and a return value as a reward and its components (`reward_of`: the contract in
rewards.py's module docstring)."""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
import threading
from collections.abc import Callable
from typing import SupportsFloat, cast


def call_with_timeout(fn: Callable, args: tuple, timeout_s: float | None):
    """`fn(*args)`, abandoned after `timeout_s` seconds with a `TimeoutError` (None: no limit).
    The call runs on a daemon thread, so one that never returns cannot hold the process open."""
    if timeout_s is None:
        return fn(*args)
    outcome: dict[str, object] = {}
    failure: list[BaseException] = []  # what the call raised, if it did

    def target() -> None:
        try:
            outcome["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=target, name="reward-fn", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"did not return within {timeout_s:g} s")
    if failure:
        raise failure[0]
    return outcome["value"]


def awaited(fn: Callable, *args):
    """`fn(*args)`; an `async def` function's coroutine run to its end on an event loop of this thread."""
    value = fn(*args)
    return asyncio.run(value) if inspect.iscoroutine(value) else value


def as_float(value: object, what: str) -> float:
    if isinstance(value, (str, bytes)) or not (isinstance(value, numbers.Real) or hasattr(type(value), "__float__")):
        raise TypeError(f"{what} is a {type(value).__name__}, expected a float or a dict[str, float]")
    # Checked above: a real number or a value with __float__ (0-d numpy/torch values convert; a
    # multi-element tensor raises here).
    out = float(cast(SupportsFloat, value))
    if not math.isfinite(out):
        raise ValueError(f"{what} is {out}, expected a finite number")
    return out


def reward_of(value: object) -> tuple[float, dict[str, float]]:
    """The reward and components of one return value (see the module docstring)."""
    if isinstance(value, dict):
        if not value:
            raise ValueError("returned an empty dict, expected a float or a dict[str, float] with at least one entry")
        components: dict[str, float] = {}
        for key, v in value.items():
            if not isinstance(key, str):
                raise TypeError(f"component key {key!r} is a {type(key).__name__}, expected str")
            components[key] = as_float(v, f"component {key!r}")
        reward = components["reward"] if "reward" in components else math.fsum(components.values())
        if not math.isfinite(reward):
            raise ValueError(f"the components sum to {reward}")
        return reward, components
    return as_float(value, "the return value"), {}
