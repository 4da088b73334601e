"""Job checkpoints: a directory per step, written under a temp name and renamed when complete.

    step-00000009/
      learner/            torch.distributed.checkpoint shards (model + optimizer), each rank its part
      rng/rank<r>.pt      torch / numpy / python RNG states and the LR scheduler of rank r
      driver.json         step, weight version, KL controller, prompt cursor, pending prompts, counters
      buffer.arrow        the experience buffer's samples (its on-disk format)
      manifest.json       step, version, sha256 of every file, per-rank state digests

Only a directory with a manifest whose checksums verify is a checkpoint; a crash or a full
disk while writing leaves a `.step-*.tmp` directory that is ignored and cleaned up, so the
previous checkpoint stays usable.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from rlhf_cluster.fileio import fsync_path, sha256_file

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match its manifest."""


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        fsync_path(path)
    fsync_path(root)


@dataclass(frozen=True)
class Checkpoint:
    """A complete, verified checkpoint."""

    path: Path
    manifest: dict

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    def driver_state(self) -> dict:
        return json.loads((self.path / "driver.json").read_text())


class CheckpointStore:
    """Creates, finalises, verifies and prunes the checkpoints of one job."""

    def __init__(self, root: str | Path, keep: int = 3):
        self.root = Path(root).expanduser()
        self.keep = keep

    @staticmethod
    def name(step: int) -> str:
        return f"step-{step:08d}"

    def begin(self, step: int) -> Path:
        """A fresh temp directory for `step`'s files (removed if it exists from a crash)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{self.name(step)}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "learner").mkdir(parents=True)
        (tmp / "rng").mkdir()
        return tmp

    def finalize(self, tmp: Path, step: int, version: int, extra: dict | None = None) -> Checkpoint:
        """Checksum every file, write the manifest, make it durable and rename it into place."""
        try:
            files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            manifest = {
                "step": step,
                "version": version,
                "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
                "files": files,
                **(extra or {}),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            _fsync_tree(tmp)
            final = self.root / self.name(step)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune()
        return Checkpoint(final, manifest)

    def abandon(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def _prune(self) -> None:
        complete = self.list()
        for path in complete[: max(0, len(complete) - self.keep)]:
            shutil.rmtree(path, ignore_errors=True)
        for tmp in self.root.glob(".step-*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)

    def list(self) -> list[Path]:
        """Checkpoint directories with a manifest, oldest first (not yet verified)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step-*") if (p / MANIFEST).is_file())

    @staticmethod
    def verify(path: str | Path) -> Checkpoint:
        """The checkpoint at `path`, or CheckpointError naming what is wrong."""
        path = Path(path).expanduser()
        if not (path / MANIFEST).is_file():
            raise CheckpointError(f"checkpoint {path}: no {MANIFEST} (not a checkpoint, or incomplete)")
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"checkpoint {path}: {MANIFEST} is not valid JSON ({exc})") from None
        for name, digest in manifest.get("files", {}).items():
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"checkpoint {path}: file {name} is missing")
            if sha256_file(file) != digest:
                raise CheckpointError(f"checkpoint {path}: file {name} does not match its sha256 (corrupted)")
        return Checkpoint(path, manifest)

    def latest(self, on_refused=None) -> Checkpoint | None:
        """The newest checkpoint that verifies; corrupted ones are reported to `on_refused` and skipped."""
        for path in reversed(self.list()):
            try:
                return self.verify(path)
            except CheckpointError as exc:
                if on_refused is not None:
                    on_refused(exc)
        return None
