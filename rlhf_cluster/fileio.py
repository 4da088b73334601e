"""Durable file primitives shared by the weight store and checkpoints."""

from __future__ import annotations

import hashlib
import os

import blake3
import threading
from pathlib import Path


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
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    fsync_path(path.parent)


def write_dir_atomic(target: str | Path, write) -> Path:
    """Build a folder with `write(tmp_dir)` under a temp name beside `target`, then put it in place.

    A crash leaves the old `target` (or none), never a half-written one; an old `target` is
    replaced.
    """
    import shutil
    import tempfile

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            doomed = target.with_name(f".{target.name}.old.{os.getpid()}")
            target.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
