"""WeightStore: versioned policy weights on a filesystem, published atomically.

Layout under the store root::

    v00000003/model-00000.safetensors ...   shards
    v00000003/manifest.json                 version, tensors (name -> dtype, shape, shard), BLAKE3 per shard
    v00000003/probe.json ...                small files published with the version (checksums in the manifest)
    v00000003/int8/manifest.json + shards   a derived variant (int8 rollout weights), made once per version
    v00000003/readers/<reader>              leases: retention never deletes a version a reader holds
    LATEST                                  the newest complete version number

A version is written under a temp name, fsynced (a durable one: every snapshot the direct
transport persists; the filesystem transport's versions between them skip the shards' fsync),
renamed into place, and only then does `LATEST` move (itself written as temp + rename), so a
reader never sees half a version.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from rlhf_cluster.fileio import FULL_DISK_WAIT_S, checksum_file, fsync_path, wait_for_space, write_atomic
from rlhf_cluster.weights.experts import checkpoint_state_dict

MANIFEST = "manifest.json"
_HASHER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="weight-checksum")  # shared: hashing beside I/O
SHARD_BYTES = 1 << 30


class WeightIntegrityError(RuntimeError):
    """A stored version does not match its manifest (missing shard or wrong checksum)."""


class WeightStore:
    """Publishes and serves policy weight versions (filesystem transport)."""

    FULL_DISK_WAIT_S = FULL_DISK_WAIT_S  # how long a version's write waits for space on a full disk

    def __init__(
        self,
        root: str | Path,
        keep: int = 3,
        variants: dict[str, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] | None = None,
    ):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        # name -> function deriving that variant's tensors from the full-precision state dict.
        self.variants = dict(variants or {})
        self.last_variant_seconds: dict[str, float] = {}
        self.last_variant_bytes: dict[str, int] = {}
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-store")
        self.last_publish_seconds = 0.0
        self.last_publish_bytes = 0

    @staticmethod
    def version_dir_name(version: int) -> str:
        return f"v{version:08d}"

    def version_dir(self, version: int) -> Path:
        return self.root / self.version_dir_name(version)

    # ---- writing -------------------------------------------------------------------------
    def publish(
        self,
        version: int,
        state_dict: dict[str, torch.Tensor],
        files: dict[str, str] | None = None,
        created_at: str | None = None,
        durable: bool = True,
    ) -> Path:
        """Write `version` durably and point LATEST at it. Blocks; see `publish_async`.

        Each of the store's `variants` (e.g. int8 rollout weights) is derived here, once per
        version, and written under ``<version>/<variant>/`` with its own manifest and checksums.
        `files` are small text files stored beside the shards (their checksums in the manifest).
        `created_at` is the version's identity beside its number (a direct delivery of the same
        version carries the same); by default now. Without `durable`, shards are not fsynced: the
        version is visible whole (rename) and checked (checksums) but may not survive a power
        loss, which is what the filesystem transport needs between durable snapshots. On a full
        disk the write waits for space, up to `FULL_DISK_WAIT_S`, then fails naming the version.
        """
        start = time.perf_counter()
        state_dict = checkpoint_state_dict(state_dict)  # an MoE's stacked experts as its folder holds them
        final = self.version_dir(version)
        if final.exists():
            raise FileExistsError(f"weight store {self.root}: version {version} already exists")
        created_at = created_at or dt.datetime.now(dt.UTC).isoformat()
        what = f"weight store {self.root}: version {version}"
        # On a full disk the write waits for space (it runs on the writer thread, beside the
        # learner's steps) and then writes the version whole, as a run's log appends do.
        manifest, _ = wait_for_space(
            lambda: self._write_version(final, version, state_dict, files, created_at, durable),
            what,
            self.FULL_DISK_WAIT_S,
        )
        latest = self.latest_version()
        if latest is None or version > latest:
            wait_for_space(lambda: write_atomic(self.root / "LATEST", str(version)), what, self.FULL_DISK_WAIT_S)
        self.last_publish_seconds = time.perf_counter() - start
        self.last_publish_bytes = manifest["total_bytes"]
        self._apply_retention()
        return final

    def _write_version(
        self,
        final: Path,
        version: int,
        state_dict: dict[str, torch.Tensor],
        files: dict[str, str] | None,
        created_at: str,
        durable: bool,
    ) -> dict:
        """Write the version in a temp directory renamed to `final` once whole; a failure
        leaves nothing. Returns its manifest."""
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=self.root))
        try:
            manifest = _write_shards(tmp, version, state_dict, created_at, durable=durable)
            manifest["durable"] = durable
            for name, text in (files or {}).items():
                (tmp / name).write_text(text)
                manifest.setdefault("files", {})[name] = checksum_file(tmp / name)
            self.last_variant_seconds, self.last_variant_bytes = {}, {}
            for variant, derive in self.variants.items():
                begun = time.perf_counter()
                (tmp / variant).mkdir()
                derived = _write_shards(
                    tmp / variant, version, derive(state_dict), created_at, variant=variant, durable=durable
                )
                write_atomic(tmp / variant / MANIFEST, json.dumps(derived, indent=1))
                self.last_variant_seconds[variant] = time.perf_counter() - begun
                self.last_variant_bytes[variant] = derived["total_bytes"]
            manifest["variants"] = sorted(self.variants)
            write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
            (tmp / "readers").mkdir()
            fsync_path(tmp)
            tmp.rename(final)
            fsync_path(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return manifest

    def publish_async(self, version: int, state_dict: dict[str, torch.Tensor], **options: Any) -> Future:
        """Queue `publish` (with its keyword `options`: files, created_at, durable) on the store's
        writer thread so the learner's next step can start.

        Versions are written in order; the caller must not mutate `state_dict` afterwards
        (the learner hands over a freshly gathered CPU copy). The future's result is the
        version's write statistics (seconds and bytes, per variant too).
        """

        def write() -> dict:
            path = self.publish(version, state_dict, **options)
            # The writer thread is serial: these are this version's figures.
            return {
                "path": str(path),
                "seconds": self.last_publish_seconds,
                "bytes": self.last_publish_bytes,
                "variant_seconds": dict(self.last_variant_seconds),
                "variant_bytes": dict(self.last_variant_bytes),
            }

        return self._writer.submit(write)

    def _apply_retention(self) -> None:
        versions = self.versions()
        for version in versions[: max(0, len(versions) - self.keep)]:
            directory = self.version_dir(version)
            if any((directory / "readers").iterdir()):
                continue
            # Rename first so a concurrent reader never opens a half-deleted version.
            doomed = self.root / f".deleting-{directory.name}-{os.getpid()}"
            try:
                directory.rename(doomed)
            except OSError:
                continue
            shutil.rmtree(doomed, ignore_errors=True)

    def discard_from(self, version: int) -> None:
        """Remove `version` and every newer one (a rollback to a checkpoint abandons them).

        LATEST moves back first, so a reader never follows it to a deleted version.
        """
        keep = [v for v in self.versions() if v < version]
        if keep:
            write_atomic(self.root / "LATEST", str(keep[-1]))
        else:
            (self.root / "LATEST").unlink(missing_ok=True)
        for v in self.versions():
            if v >= version:
                doomed = self.root / f".deleting-{self.version_dir_name(v)}-{os.getpid()}"
                self.version_dir(v).rename(doomed)
                shutil.rmtree(doomed, ignore_errors=True)

    # ---- reading -------------------------------------------------------------------------
    def latest_version(self) -> int | None:
        try:
            return int((self.root / "LATEST").read_text().strip())
        except FileNotFoundError:
            return None

    def versions(self) -> list[int]:
        out = []
        for entry in self.root.iterdir():
            if entry.name.startswith("v") and (entry / MANIFEST).is_file():
                out.append(int(entry.name[1:]))
        return sorted(out)

    def manifest(self, version: int, variant: str | None = None) -> dict:
        """The manifest of `version` (or of its `variant`, e.g. ``int8``)."""
        path = self.version_dir(version) / (variant or "") / MANIFEST
        if not path.is_file():
            what = f"variant {variant!r}" if variant else "manifest"
            raise FileNotFoundError(f"weight store {self.root}: version {version} has no {what}")
        return json.loads(path.read_text())

    def read_file(self, version: int, name: str) -> str | None:
        """A text file published with `version` (None if it has none); its checksum is checked."""
        digest = self.manifest(version).get("files", {}).get(name)
        if digest is None:
            return None
        path = self.version_dir(version) / name
        if checksum_file(path) != digest:
            raise WeightIntegrityError(f"version {version}: {name} checksum does not match the manifest")
        return path.read_text()

    def load(self, version: int, verify: bool = True, variant: str | None = None) -> dict[str, torch.Tensor]:
        """All tensors of `version` (or of its `variant`); with `verify`, every shard's checksum is checked first."""
        directory = self.version_dir(version) / (variant or "")
        manifest = self.manifest(version, variant)
        if verify and manifest.get("checksum") != "blake3":
            raise WeightIntegrityError(
                f"version {version}: written by an older build (sha256 checksums); "
                f"this build checks BLAKE3: publish it again or start a new run_dir"
            )
        out: dict[str, torch.Tensor] = {}
        for shard, digest in manifest["shards"].items():
            path = directory / shard
            if not path.is_file():
                raise WeightIntegrityError(f"version {version}: shard {shard} is missing")
            # The checksum (through a memory map) runs beside loading the tensors; both read the page cache.
            computed = _HASHER.submit(checksum_file, path) if verify else None
            tensors = safetensors.torch.load_file(str(path))
            if computed is not None and computed.result() != digest:
                raise WeightIntegrityError(f"version {version}: shard {shard} checksum does not match the manifest")
            out.update(tensors)
        expected = set(manifest["tensors"])
        if set(out) != expected:
            raise WeightIntegrityError(
                f"version {version}: tensors differ from the manifest: {sorted(expected ^ set(out))[:5]}"
            )
        return out

    def acquire(self, version: int, reader: str) -> None:
        """Lease `version` for `reader`: retention keeps it until `release`."""
        (self.version_dir(version) / "readers" / reader).touch()

    def release(self, version: int, reader: str) -> None:
        (self.version_dir(version) / "readers" / reader).unlink(missing_ok=True)

    def close(self) -> None:
        self._writer.shutdown(wait=True)


class _ShardWriter:
    """The safetensors shards of one write, up to `SHARD_BYTES` each: the one being filled, and
    the BLAKE3 checksum of each one written (by file name)."""

    def __init__(self, directory: Path, version: int, durable: bool):
        self.directory, self.version, self.durable = directory, version, durable
        self.checksums: dict[str, str] = {}
        self.current: dict[str, torch.Tensor] = {}
        self.size = 0

    @property
    def name(self) -> str:
        """The file name of the shard being filled."""
        return f"model-{len(self.checksums):05d}.safetensors"

    def add(self, key: str, tensor: torch.Tensor, nbytes: int) -> None:
        """`tensor` (on the CPU, owning its storage) into the current shard, or a new one when it would overflow."""
        if self.current and self.size + nbytes > SHARD_BYTES:
            self.flush()
        self.current[key] = tensor
        self.size += nbytes

    def flush(self) -> None:
        """Write the current shard (fsynced if durable) and record its checksum."""
        if not self.current:
            return
        name = self.name
        # Serialise once in memory: the checksum comes from the bytes being written, not from
        # reading the file back (which doubled the store's I/O).
        path = self.directory / name
        safetensors.torch.save_file(self.current, str(path), metadata={"version": str(self.version)})
        # The checksum reads the written bytes back from the page cache while fsync makes them durable.
        digest = _HASHER.submit(checksum_file, path)
        if self.durable:
            fsync_path(path)
        self.checksums[name] = digest.result()
        self.current, self.size = {}, 0


def _write_shards(
    directory: Path,
    version: int,
    state_dict: dict[str, torch.Tensor],
    created_at: str,
    variant: str | None = None,
    durable: bool = True,
) -> dict:
    """Write `state_dict` as safetensors shards in `directory` (fsynced if `durable`); returns their manifest."""
    tensors: dict[str, dict] = {}  # name -> its dtype, shape and shard
    shards = _ShardWriter(directory, version, durable)
    total = 0
    storages: set[int] = set()
    for key, tensor in state_dict.items():
        t = tensor.detach().to("cpu").contiguous()
        # safetensors refuses tensors sharing memory (tied embeddings): store a copy.
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages:
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        nbytes = t.numel() * t.element_size()
        shards.add(key, t, nbytes)
        total += nbytes
        tensors[key] = {
            "dtype": str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape),
            "shard": shards.name,
        }
    shards.flush()
    manifest = {
        "version": version,
        "created_at": created_at,
        "checksum": "blake3",
        "total_bytes": total,
        "tensors": tensors,
        "shards": shards.checksums,
    }
    if variant is not None:
        manifest["variant"] = variant
    return manifest
