"""ExperienceBuffer: scored samples waiting for the learner, kept in whole GRPO groups.

Samples enter as complete groups (advantages are already computed over the group) and leave as
complete groups. `take` enforces the staleness bound where data is consumed: groups generated
with a version older than `min_version` (`ScoredSample.effective_version`, which counts steps a
rollback abandoned) are dropped and counted, never used. A sample id is
accepted once; a retry that lands twice is refused and counted.
"""

from __future__ import annotations

import os
from collections import Counter, OrderedDict
from pathlib import Path

import pyarrow as pa

from rlhf_cluster.experience.records import SAMPLE_SCHEMA, ScoredSample, samples_to_table, table_to_samples

STALE = "stale"  # why `take` drops a group: generated with a version older than it admits


def group_version(group: list[ScoredSample]) -> int:
    """The version a group's staleness is measured from: its stalest sample's."""
    return min(s.effective_version for s in group)


class BufferFullError(RuntimeError):
    """Adding would exceed the buffer's capacity (admission control should prevent this)."""


class ExperienceBuffer:
    """Holds scored sample groups in arrival order, up to `capacity` samples."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._groups: OrderedDict[str, list[ScoredSample]] = OrderedDict()
        self._seen: set[str] = set()
        self.depth = 0
        self.dropped: Counter[str] = Counter()
        self.added_total = 0
        self.taken_total = 0

    def add_group(self, group: list[ScoredSample]) -> int:
        """Add one complete group; returns how many samples were new (duplicates are refused)."""
        fresh, ids = [], set()
        for s in group:
            if s.sample_id not in self._seen and s.sample_id not in ids:
                fresh.append(s)
                ids.add(s.sample_id)
        if len(fresh) < len(group):
            self.dropped["duplicate"] += len(group) - len(fresh)
        if not fresh:
            return 0
        if self.depth + len(fresh) > self.capacity:
            raise BufferFullError(
                f"buffer holds {self.depth} samples; adding {len(fresh)} exceeds capacity {self.capacity}"
            )
        self._groups.setdefault(fresh[0].group_id, []).extend(fresh)
        self._seen.update(s.sample_id for s in fresh)
        self.depth += len(fresh)
        self.added_total += len(fresh)
        return len(fresh)

    def drop_stale(self, min_version: int) -> int:
        """Drop every group generated with a version older than `min_version`; returns samples dropped."""
        stale = [g for g, samples in self._groups.items() if group_version(samples) < min_version]
        n = 0
        for group_id in stale:
            n += len(self._groups.pop(group_id))
        self.depth -= n
        self.dropped[STALE] += n
        return n

    def refuse_stale(self, group: list[ScoredSample], min_version: int) -> bool:
        """Whether `group` is older than `min_version`; if so it is counted as dropped stale, as
        `take` counts it, and not held."""
        if group_version(group) >= min_version:
            return False
        self.dropped[STALE] += len(group)
        return True

    def ready_groups(self) -> int:
        return len(self._groups)

    def take(self, num_groups: int, min_version: int) -> list[ScoredSample] | None:
        """`num_groups` groups, oldest version first, or None if fewer are admissible now."""
        self.drop_stale(min_version)
        if len(self._groups) < num_groups:
            return None
        order = sorted(self._groups, key=lambda g: group_version(self._groups[g]))
        out: list[ScoredSample] = []
        for group_id in order[:num_groups]:
            out.extend(self._groups.pop(group_id))
        self.depth -= len(out)
        self.taken_total += len(out)
        return out

    # ---- persistence: the Arrow IPC file is the on-disk format of the sample schema ----------
    def save(self, path: str | Path) -> Path:
        """Write the buffered samples to an Arrow IPC file atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = samples_to_table(s for group in self._groups.values() for s in group)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, SAMPLE_SCHEMA) as writer:
            writer.write_table(table)
        tmp.replace(path)
        return path

    def load(self, path: str | Path) -> int:
        """Add the samples of a file written by `save`; returns how many were added."""
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
        groups: OrderedDict[str, list[ScoredSample]] = OrderedDict()
        for sample in table_to_samples(table):
            groups.setdefault(sample.group_id, []).append(sample)
        return sum(self.add_group(g) for g in groups.values())
