"""The scored-group log: every group that came back from scoring, appended as it arrives, so a
resumed job does not generate again what was already generated and scored. Ray-free.

Groups are numbered in arrival order (`seq`). `append` keeps them in memory; `flush` writes the
pending ones as one segment (an Arrow IPC file of the sample schema, its groups' seq numbers and
fates in the schema metadata), fsynced and renamed into place, so a kill loses at most the groups
since the last flush and never leaves half a segment; a flush that fails (a full disk) keeps its
groups pending and the next one writes them. A checkpoint records the seq its state
covers (`next_seq`, flushed first, so a segment never straddles it); on resume the groups from
that seq on are read back (`resume_from`) and the job decides which to reuse. They stay in the
log as they are, so a resume that dies before the next checkpoint loses none (the next resume
reads them again); the resumed job numbers its groups after them. `compact` drops segments no
kept checkpoint can need.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa

from rlhf_cluster.experience.records import ScoredSample, samples_to_table, table_to_samples

BUFFERED = "buffered"


log = logging.getLogger(__name__)


class LoggedGroup(NamedTuple):
    """A group read back from the log: what became of it, its samples, and how many of its samples
    were left out before it was built because their reward failed (counted as dropped; not logged)."""

    fate: str
    samples: list[ScoredSample]
    failed: int


class ScoredLogFlushError(OSError):
    """A flush could not write its segment; its groups stay pending for the next flush."""


class ScoredLog:
    """Append-only log of scored groups under `directory` (one file per flush)."""

    def __init__(self, directory: Path, next_seq: int = 0):
        self.directory = directory
        self.next_seq = next_seq
        self._pending: list[tuple[int, LoggedGroup]] = []
        self.failed_flushes = 0  # in a row: reset by a flush that succeeds
        self._lock = threading.Lock()  # `flush` may run on a worker thread while groups arrive

    def append(self, samples: list[ScoredSample], fate: str, failed: int = 0) -> None:
        """One scored group and what became of it (`buffered`, or why it was dropped); `failed`: its
        samples left out because their reward failed, so a resume counts them again."""
        with self._lock:
            self._pending.append((self.next_seq, LoggedGroup(fate, samples, failed)))
            self.next_seq += 1

    def flush(self) -> None:
        """Write the pending groups as one durable segment (nothing when none are pending).

        A failed write (a full disk: ENOSPC, or any OSError) leaves no partial segment and keeps
        every group pending, so the next flush writes them with the newer ones; the error is
        raised as `ScoredLogFlushError` for the caller to report and go on (see `failed_flushes`)."""
        with self._lock:
            pending = list(self._pending)
        if not pending:
            return
        try:
            self._write_segment(pending)
        except OSError as exc:
            self.failed_flushes += 1
            raise ScoredLogFlushError(
                f"scored log {self.directory}: writing {len(pending)} scored group(s) failed ({exc}); they are kept in "
                f"memory and written by the next flush ({self.failed_flushes} failed flush(es) so far)"
            ) from exc
        written = {id(p) for p in pending}
        with self._lock:  # groups that arrived during the write stay pending
            self._pending = [p for p in self._pending if id(p) not in written]
        self.failed_flushes = 0

    def flush_or_keep(self) -> None:
        """`flush`, where a failed write is logged, not raised: a full disk must neither end the
        job nor lose groups (they stay pending for the next flush)."""
        try:
            self.flush()
        except ScoredLogFlushError as exc:
            log.warning("%s", exc)

    @property
    def unflushed(self) -> int:
        """How many groups are held in memory only (since the last flush that succeeded)."""
        return len(self._pending)

    def _write_segment(self, pending: list[tuple[int, LoggedGroup]]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        groups = [[seq, g.fate, g.samples[0].group_id, g.failed] for seq, g in pending]
        table = samples_to_table(s for _, g in pending for s in g.samples)
        table = table.replace_schema_metadata({"groups": json.dumps(groups)})
        path = self.directory / f"seg-{pending[0][0]:010d}-{pending[-1][0]:010d}.arrow"
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as fh:
                with pa.ipc.new_file(fh, table.schema) as writer:
                    writer.write_table(table)
                fh.flush()
                os.fsync(fh.fileno())
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # half a segment would take the space the retry needs
            raise

    def _segments(self) -> list[tuple[int, int, Path]]:
        if not self.directory.is_dir():
            return []
        out = []
        for path in self.directory.glob("seg-*.arrow"):
            first, last = (int(x) for x in path.stem.removeprefix("seg-").split("-"))
            out.append((first, last, path))
        return sorted(out)

    def since(self, seq: int) -> list[tuple[str, list[ScoredSample]]]:
        """The groups numbered `seq` and later, in order: (fate, samples)."""
        return [(g.fate, g.samples) for g in self._groups_since(seq)]

    def _groups_since(self, seq: int) -> list[LoggedGroup]:
        out = []
        for _first, last, path in self._segments():
            if last < seq:
                continue
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_file(source).read_all()
            groups = json.loads(table.schema.metadata[b"groups"])
            samples = table_to_samples(table.replace_schema_metadata(None))
            by_group: dict[str, list[ScoredSample]] = {}
            for s in samples:
                by_group.setdefault(s.group_id, []).append(s)
            # A segment written before the failed count was logged has three fields a group.
            out += [LoggedGroup(g[1], by_group[g[2]], g[3] if len(g) > 3 else 0) for g in groups if g[0] >= seq]
        return out

    def resume_from(self, seq: int) -> list[LoggedGroup]:
        """The groups numbered `seq` and later, for a resume from the checkpoint that recorded
        `seq`; the groups logged from now on are numbered after every group on disk."""
        segments = self._segments()
        for first, last, path in segments:
            if first < seq <= last:
                raise ValueError(f"{path}: a segment straddles seq {seq}; checkpoints flush the log first")
        found = self._groups_since(seq)
        self.next_seq = max([seq, *(last + 1 for _first, last, _path in segments)])
        return found

    def truncate(self, seq: int) -> None:
        """Forget the groups numbered `seq` and later (a rollback to the job's start: they belong to
        the run it abandons)."""
        self._pending = [p for p in self._pending if p[0] < seq]
        for first, last, path in self._segments():
            if first >= seq:
                path.unlink()
            elif last >= seq:
                raise ValueError(f"{path}: a segment straddles seq {seq}; checkpoints flush the log first")
        self.next_seq = seq

    def compact(self, seq: int) -> None:
        """Drop the segments whose groups are all numbered before `seq`."""
        for _first, last, path in self._segments():
            if last < seq:
                path.unlink()
