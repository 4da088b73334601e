"""One job per run directory: an advisory lock held for the job's lifetime.

The lock is `flock` on `RUN_DIR/job.lock`, which holds who took it (job name, pid, host, start
time) for the message a second job gets. The kernel drops the lock when its process dies, so a
lock left by a killed job is taken over safely: the file may remain, the lock does not. (flock is
per host; on a network filesystem shared by two hosts it may not exclude a job on another host.)
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path


class RunDirBusy(RuntimeError):
    """Another live job holds the run directory."""


class RunLock:
    """The run directory's lock, taken on construction, released by `release` or process exit."""

    NAME = "job.lock"

    def __init__(self, root: Path, job_name: str):
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / self.NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raw = os.pread(fd, 4096, 0)
            os.close(fd)
            try:
                written = json.loads(raw)
            except ValueError:
                written = None
            raise RunDirBusy(in_use_message(root, written)) from None
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            json.dumps(
                {
                    "job": job_name,
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }
            ).encode(),
            0,
        )
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # no holder named once released (`holder`; a killed job's stays, dead)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def in_use_message(root: Path, holder: dict | None) -> str:
    """What a second job is told: who holds `root`, as it wrote itself into the lock file."""
    who = "another job"  # a lock file written by something else, or being written
    if isinstance(holder, dict) and {"job", "pid", "host", "started_at"} <= holder.keys():
        who = f"job {holder['job']!r} (pid {holder['pid']} on {holder['host']}, started {holder['started_at']})"
    return (
        f"run_dir {root} is in use by {who}; give this job its own run_dir, "
        "or stop that one first (`rlhf-cluster stop`, or SIGTERM to its driver)"
    )


def holder(root: Path) -> dict | None:
    """Who holds `root`'s lock now, as it wrote itself into the lock file (job, pid, host,
    started_at), or None when no live process on this host does. Reads only: it never takes the
    lock, so a job starting meanwhile is never refused because of it. A holder on another host
    is reported as it wrote itself (its liveness cannot be checked from here)."""
    try:
        raw = json.loads((root / RunLock.NAME).read_text())
        pid, host = int(raw["pid"]), str(raw["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname():
        return raw
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return raw
