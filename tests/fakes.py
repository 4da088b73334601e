"""Stand-ins for Ray objects in unit tests that check our bookkeeping, not Ray's."""

from __future__ import annotations


class RemoteMethod:
    """A Ray actor method's stand-in: `remote(*args)` calls `run(*args)` and returns what it returns
    (an async `run` gives a coroutine, awaited where an `ObjectRef` would be)."""

    def __init__(self, run):
        self.run = run

    def remote(self, *args):
        return self.run(*args)
