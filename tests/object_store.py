"""Ray's object store for one process, for the weight path's CPU tests (the transports in
test_weight_transports, the engine's receiver in test_receiver): a handle is an index into a list."""

from __future__ import annotations

import numpy as np


class ObjectStore:
    """Ray's put/get for one process: a handle is an index into a list; `put` copies what it is
    given, as Ray's does (the sender refills its staging memory for the next bucket)."""

    def __init__(self):
        self.objects: list = []

    def put(self, value) -> int:
        self.objects.append(np.array(value, copy=True))
        return len(self.objects) - 1

    def get(self, handles: list[int]) -> list:
        return [self.objects[h] for h in handles]
