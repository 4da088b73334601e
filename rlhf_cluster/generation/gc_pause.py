"""Heavy imports with Python's cyclic garbage collector paused, their objects frozen afterwards.

Importing vLLM creates ~460,000 long-lived objects the collector tracks (on top of torch's
~170,000: modules, classes, functions). While it runs, the allocation count keeps triggering
collections that scan all of them again, and vLLM's engine start calls `gc.collect()` itself
several times: on the 2-core CPU machine that is ~2.4 s of a ~7 s engine start. `gc.freeze()`
moves what the import made into the permanent generation, so neither those collections nor later
ones during generation scan it. Nothing imported is garbage.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def imports_without_gc() -> Iterator[None]:
    """Pause the cyclic GC for the block (re-enabled afterwards only if it was on), then freeze
    every object alive at its end out of future collections."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()
