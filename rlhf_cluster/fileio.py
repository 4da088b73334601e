"""File primitives every layer uses: checksums, durable writes, a write that waits out a full
disk, JSONL logs read as a crash leaves them, a process's scratch folders (`scratch_dir`), and a
finished future for work done synchronously (`done_future`)."""

from __future__ import annotations

import atexit
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import blake3

log = logging.getLogger(__name__)
T = TypeVar("T")

FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
FULL_DISK_WAIT_S = 600.0  # how long a write waits for space on a full disk before it fails
# How libraries that write through their own (Rust, C) I/O word the same errors: safetensors
# raises `SafetensorError("... No space left on device (os error 28)")`, not an OSError.
_FULL_DISK_WORDS = tuple(os.strerror(n) for n in FULL_DISK_ERRNOS)


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` is a write failing for want of space (or quota)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in FULL_DISK_ERRNOS
    return any(words in str(exc) for words in _FULL_DISK_WORDS)


def wait_for_space(attempt: Callable[[], T], what: str, wait_s: float) -> tuple[T, float | None]:
    """`attempt()`, tried again while it fails for a full disk (with a warning, waits doubling
    from 0.2 s to 5 s) until `wait_s` have passed, then an OSError naming `what`. `attempt` must
    leave nothing behind when it fails. Returns its result and the seconds waited (None: no wait)."""
    began, delay = time.monotonic(), 0.2
    while True:
        try:
            result = attempt()
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            waited = time.monotonic() - began
            if waited > wait_s:
                raise OSError(errno.ENOSPC, f"{what}: the disk stayed full for {waited:.0f} s: {exc}") from exc
            if delay == 0.2:
                log.warning(f"{what}: the disk is full; waiting for space (up to {wait_s:.0f} s)")
            time.sleep(delay)
            delay = min(2 * delay, 5.0)
        else:
            return result, (time.monotonic() - began if delay > 0.2 else None)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checksum(payload) -> str:
    """BLAKE3 of a bytes-like object: the weight store's and weight delivery's checksum. It is
    multi-threaded above 1 MiB and runs at memory speed, where sha256 ran at ~0.5 GB/s."""
    view = memoryview(payload).cast("B")
    threads = blake3.blake3.AUTO if view.nbytes >= (1 << 20) else 1
    return blake3.blake3(view, max_threads=threads).hexdigest()


def checksum_file(path: str | Path) -> str:
    """`checksum` of a file's bytes, read through a memory map (no copy into this process)."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    if Path(path).stat().st_size:
        hasher.update_mmap(str(path))
    return hasher.hexdigest()


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory (a directory's fsync makes renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file and a rename: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves no temp file taking its space
        raise
    fsync_path(path.parent)


def _aside(target: Path) -> Path:
    """Where `write_dir_atomic` keeps the previous version of `target` while the new one goes in."""
    return target.with_name(f".{target.name}.old")


def recover_dir(target: str | Path) -> Path:
    """Undo a crash inside `write_dir_atomic`: when only the previous version is left (at its
    aside name), put it back as `target`; remove what a crash left to be deleted. Returns `target`."""
    import shutil

    target = Path(target)
    aside = _aside(target)
    if aside.is_dir() and not target.exists():
        aside.rename(target)  # the aside copy is always complete: it got its name by one rename
        fsync_path(target.parent)
    for doomed in target.parent.glob(f".{target.name}.doomed.*"):
        shutil.rmtree(doomed, ignore_errors=True)
    return target


def write_dir_atomic(target: str | Path, write) -> Path:
    """Build a folder with `write(tmp_dir)` under a temp name beside `target`, then put it in place.

    The new version is installed before the old one is removed: old -> `.NAME.old`, new -> NAME,
    then the old one is renamed to a doomed name and deleted. Every step is one rename, so a
    crash at any point leaves a complete version (`recover_dir`, run first here, puts back an
    old version that a crash left only at its aside name).
    """
    import shutil
    import tempfile

    target = recover_dir(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    aside = _aside(target)
    if aside.exists():  # a crash after an earlier install: `target` is the newer complete version
        _discard(aside)
    try:
        if target.exists():
            target.rename(aside)
        tmp.rename(target)
    except Exception:  # an error, not a crash: the old version goes back in place at once
        recover_dir(target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(target.parent)
    if aside.exists():
        _discard(aside)
    return target


def _discard(path: Path) -> None:
    """Delete a directory by first renaming it out of its name, so no name ever holds half of one."""
    import shutil

    doomed = path.with_name(f"{path.name.removesuffix('.old')}.doomed.{os.getpid()}.{threading.get_ident()}")
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


_BLANK = b" \t\r\0"  # a power loss can leave a file's last blocks as NUL bytes


def output_path(out: str | Path) -> Path:
    """`out` as a Path, once its folder is known to exist: a missing one is named (a
    FileNotFoundError), not the temp file that a write would otherwise fail on."""
    target = Path(out)
    folder = target.parent
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"cannot write {target}: its folder {folder} {problem}")
    return target


def scratch_dir(prefix: str, root: str | Path | None = None) -> Path:
    """A new private folder for this process's scratch files, `<root>/<prefix>-<host>-<pid>-<random>`
    (root: the system's temp folder), removed when the process exits normally (its owner may remove
    it sooner). The folders of the same prefix that processes of this host left behind when they were
    killed (a SIGKILLed Ray actor runs no cleanup) are removed first: only those whose process is gone."""
    base = Path(root) if root is not None else Path(tempfile.gettempdir())
    mine = f"{prefix}-{socket.gethostname()}-"
    for left in base.glob(f"{mine}*"):
        pid = left.name[len(mine) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)) and left.is_dir():
            shutil.rmtree(left, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=f"{mine}{os.getpid()}-", dir=base))
    atexit.register(shutil.rmtree, str(path), ignore_errors=True)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class CorruptLogError(ValueError):
    """A JSONL log has a damaged line that is not its last, so a crash mid-append does not explain it."""


@dataclass(frozen=True)
class JsonlLog:
    """A JSONL file as read: its rows, and where its well-formed part ends (`clean_end` bytes of
    `size`; anything after is a torn final line, `torn_line`, or trailing NUL/blank junk)."""

    path: Path
    rows: list[dict]
    clean_end: int
    size: int
    torn_line: int | None = None


@dataclass(frozen=True)
class JsonlScan:
    """A JSONL file checked as `read_jsonl` reads it, without keeping its rows: where its
    well-formed part ends, whether its last row lost its newline (`unterminated`), and `steps`, the
    (byte offset, step) of each row whose `step` differs from the row before (-1 for a row with
    none): enough to know where to cut it after a step."""

    path: Path
    clean_end: int
    size: int
    torn_line: int | None
    steps: list[tuple[int, int]]
    unterminated: bool


def read_jsonl(path: Path) -> JsonlLog:
    """The rows of a JSONL file (none if it does not exist). A final line that does not parse is
    what a crash mid-append leaves: it is left out (`torn_line`). A line that does not parse with
    rows after it raises `CorruptLogError` naming the file and line."""
    rows: list[dict] = []
    clean_end, size, torn_line, _ = _walk_jsonl(path, lambda offset, row: rows.append(row))
    return JsonlLog(path, rows, clean_end, size, torn_line)


def scan_jsonl(path: Path) -> JsonlScan:
    """`read_jsonl`'s checks in one streaming pass that keeps no rows (a resume checks logs of
    millions of rows: read whole, they would take gigabytes)."""
    steps: list[tuple[int, int]] = []

    def seen(offset: int, row: dict) -> None:
        step = row.get("step", -1)
        if not steps or steps[-1][1] != step:
            steps.append((offset, step))

    clean_end, size, torn_line, unterminated = _walk_jsonl(path, seen)
    return JsonlScan(path, clean_end, size, torn_line, steps, unterminated)


def _walk_jsonl(path: Path, on_row: Callable[[int, dict], None]) -> tuple[int, int, int | None, bool]:
    """Call `on_row(byte offset, row)` for each row of a JSONL file, line by line; returns
    (clean_end, size, torn_line) as `JsonlLog` defines them and whether the last row lacks its
    newline."""
    if not path.exists():
        return 0, 0, None, False
    offset = clean_end = 0
    unterminated = False
    bad: tuple[int, str] | None = None  # a line that did not parse: (its number, why)
    after_bad = 0  # meaningful lines after it (any: it was not torn by a crash, the file is damaged)
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip(_BLANK + b"\n"):
                if bad is not None:
                    after_bad += 1
                else:
                    try:
                        row = json.loads(line)
                        if not isinstance(row, dict):
                            raise ValueError(f"a JSON {type(row).__name__}, expected an object")
                    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError included
                        bad = (number, str(exc))
                    else:
                        on_row(offset, row)
                        clean_end = offset + len(line)
                        unterminated = not line.endswith(b"\n")
            offset += len(line)
    if bad is not None and after_bad:
        raise CorruptLogError(
            f"{path}: line {bad[0]} is not a JSON object ({bad[1]}); only the last line can be torn by a crash and "
            f"{after_bad} line(s) follow it, so the file was damaged otherwise: repair or remove that line"
        )
    return clean_end, offset, bad[0] if bad is not None else None, unterminated


def done_future(result: Any = None) -> Future:
    """A future that has already finished with `result` (for work done synchronously)."""
    future: Future = Future()
    future.set_result(result)
    return future
