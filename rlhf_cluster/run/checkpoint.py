"""Job checkpoints: a directory per step, written under a temp name and renamed when complete.

    step-00000009/
      learner/            torch.distributed.checkpoint shards (model + optimizer), each rank its part
      rng/rank<r>.pt      torch / numpy / python RNG states and the LR scheduler of rank r
                          (tensors and a JSON string, read with `torch.load(weights_only=True)`)
      driver.json         step, weight version, KL controller, prompt cursor, pending prompts, counters
      buffer.arrow        the experience buffer's samples (its on-disk format)
      manifest.json       step, version, sha256 of every file, per-rank state digests

Only a directory with a manifest whose checksums verify is a checkpoint; a crash or a full
disk while writing leaves a `.step-*.tmp` directory that is ignored and cleaned up, so the
previous checkpoint stays usable.

Resuming never deletes what it cannot verify (`resume_point`): a `step-*` directory that does not
verify is skipped for an older one that does and kept, renamed `refused-step-*` (so neither
retention nor a later checkpoint of the same step removes it); when none verifies the resume is
refused with every checkpoint named and nothing on disk changed.
"""

from __future__ import annotations

import builtins
import datetime as dt
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from rlhf_cluster.fileio import fsync_path, sha256_file

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match its manifest."""


class NoVerifiedCheckpoint(CheckpointError):
    """Checkpoints are present but none verifies: resuming would have to start over, which only
    an explicit `--overwrite` may do."""


STEP_DIR = re.compile(r"step-\d+")  # a checkpoint's own name; `refused-step-*` and `.step-*.tmp` are not


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


# A checkpoint's key: its index among the kept ones, or its directory name (zero-padded, so it sorts by age).
CheckpointKey = TypeVar("CheckpointKey", int, str)


def best_checkpoints(scored: dict[CheckpointKey, float], keep: int, higher_is_better: bool) -> set[CheckpointKey]:
    """The keys of the `keep` best scores (ties: the smaller key, the older checkpoint)."""
    order = sorted(scored, key=lambda step: (-scored[step] if higher_is_better else scored[step], step))
    return set(order[:keep])


class CheckpointStore:
    """Creates, finalises, verifies and prunes the checkpoints of one job."""

    def __init__(self, root: str | Path, keep: int = 3, keep_best: int = 0, higher_is_better: bool = True):
        self.root = Path(root).expanduser()
        self.keep = keep
        # Also kept: the `keep_best` checkpoints whose manifest scores best (its "guard" entry, the
        # evaluation metric `guardrails.keep_best` ranks by).
        self.keep_best, self.higher_is_better = keep_best, higher_is_better

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
                "created_at": dt.datetime.now(dt.UTC).isoformat(),
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
        kept = set(complete[max(0, len(complete) - self.keep) :])
        if self.keep_best:
            scored = {i: score for i, path in enumerate(complete) if (score := self.score(path)) is not None}
            kept |= {complete[i] for i in best_checkpoints(scored, self.keep_best, self.higher_is_better)}
        for path in complete:
            if path not in kept:
                shutil.rmtree(path, ignore_errors=True)
        for tmp in self.root.glob(".step-*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def score(path: Path) -> float | None:
        """The evaluation metric a checkpoint was ranked by (`guardrails.keep_best`), if any."""
        try:
            guard = json.loads((path / MANIFEST).read_text()).get("guard")
        except (OSError, json.JSONDecodeError):
            return None
        return None if guard is None else float(guard["value"])

    def list(self) -> builtins.list[Path]:  # `builtins.`: in this class `list` is this method
        """Checkpoint directories with a manifest, oldest first (not yet verified)."""
        return [p for p in self.candidates() if (p / MANIFEST).is_file()]

    def candidates(self) -> builtins.list[Path]:
        """Every `step-*` directory, oldest first, a manifest or not: finalize renames a directory
        into place only after its manifest is written, so one without is a damaged checkpoint."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step-*") if STEP_DIR.fullmatch(p.name) and p.is_dir())

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

    def resume_point(self, on_refused=None) -> Checkpoint | None:
        """The newest checkpoint that verifies, None when there is no checkpoint at all, and
        `NoVerifiedCheckpoint` (naming each one and why) when there are some but none verifies:
        starting over would lose the run. Nothing is changed on disk; `on_refused` hears of each
        newer checkpoint skipped on the way to one that verifies, as (path, error)."""
        refused: list[tuple[Path, CheckpointError]] = []
        for path in reversed(self.candidates()):
            try:
                chosen = self.verify(path)
            except CheckpointError as exc:
                refused.append((path, exc))
                continue
            for skipped, error in refused:
                if on_refused is not None:
                    on_refused(skipped, error)
            return chosen
        if refused:
            raise NoVerifiedCheckpoint(
                f"none of the {len(refused)} checkpoint(s) in {self.root} verifies, so there is nothing to resume "
                "from; nothing was changed on disk:\n"
                + "\n".join(f"  - {exc}" for _, exc in refused)
                + "\nresume from one you trust with --resume PATH, repair or move away the damaged ones, or start "
                "over with --overwrite (moves this run aside)"
            )
        return None

    def set_aside(self, path: Path, why: str = "refused") -> Path:
        """Rename a checkpoint (one that did not verify, or one a rollback abandoned) to
        `<why>-<name>` beside it, out of reach of retention and of a later checkpoint of the same
        step: it is kept, never deleted."""
        target = path.with_name(f"{why}-{path.name}")
        n = 1
        while target.exists():
            target, n = path.with_name(f"{why}-{path.name}.{n}"), n + 1
        path.rename(target)
        fsync_path(path.parent)
        return target

    def latest(self, on_refused=None) -> Checkpoint | None:
        """The newest checkpoint that verifies; corrupted ones are reported to `on_refused` and skipped."""
        for path in reversed(self.list()):
            try:
                return self.verify(path)
            except CheckpointError as exc:
                if on_refused is not None:
                    on_refused(exc)
        return None
