"""The files of one run, by name: every component reads and writes the run directory through here.

Nothing of a run is deleted unless asked for by name: a fresh job in a directory that holds an
earlier run refuses it, `--overwrite` moves it aside to `RUN_DIR.old-<time>`, and only
`--overwrite=delete` removes it. The JSONL logs survive a crash mid-append: a torn final line is
ignored when read and cut off (with a warning) when a run resumes; a damaged line anywhere else is
an error naming the file and line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from rlhf_cluster.fileio import (
    FULL_DISK_WAIT_S,
    CorruptLogError,
    JsonlScan,
    fsync_path,
    read_jsonl,
    scan_jsonl,
    wait_for_space,
    write_atomic,
)
from rlhf_cluster.run.checkpoint import MANIFEST, STEP_DIR, Checkpoint, CheckpointError, CheckpointStore
from rlhf_cluster.run.lock import RunLock, holder, in_use_message
from rlhf_cluster.telemetry.trackers import TENSORBOARD_DIR, WANDB_DIR, WANDB_ID

log = logging.getLogger(__name__)

OVERWRITE_MODES = ("aside", "delete")
FAILED = "failed"  # the events.jsonl row of a job that ended with an error: `{"event": "failed", "error": ...}`
CAUSE_CHARS = 300  # a failure's cause, as events.jsonl and `rlhf-cluster status` keep it


def failure_cause(exc: BaseException, limit: int = CAUSE_CHARS) -> str:
    """The error a job ended with on one line, `Type: message`: a remote task's error unwrapped
    (Ray's `cause`), the message's first line, cut to `limit` characters (ending in `...`)."""
    cause = getattr(exc, "cause", None)
    cause = cause if isinstance(cause, BaseException) else exc
    lines = str(cause).strip().splitlines()
    text = f"{type(cause).__name__}: {lines[0].strip()}" if lines else type(cause).__name__
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


class RunDirInUse(RuntimeError):
    """A fresh job was pointed at a directory that holds an earlier run's results."""


def repair_jsonl(path: Path, found: JsonlScan | None = None) -> str | None:
    """Cut a torn final line (or trailing junk) off a JSONL file, so appends after a crash start
    on a line of their own; returns what was done (None when the file was whole). `found` is the
    file's scan when the caller has one."""
    found = found or scan_jsonl(path)
    if found.clean_end == found.size and not found.unterminated:
        return None
    with open(path, "r+b") as fh:
        fh.truncate(found.clean_end)
        if found.unterminated:  # a whole row whose newline was lost: keep it, end it
            fh.seek(found.clean_end)
            fh.write(b"\n")
        fh.flush()
        os.fsync(fh.fileno())
    what = f"a torn final line (line {found.torn_line})" if found.torn_line else "trailing partial data"
    return f"{path}: cut off {what}, {found.size - found.clean_end} bytes left by a crash mid-write"


def overwrite_mode(overwrite: bool | str | None) -> str | None:
    """`--overwrite` as given: False/None (refuse an earlier run), True or 'aside', or 'delete'."""
    if overwrite is True:
        return "aside"
    if not overwrite:
        return None
    if overwrite not in OVERWRITE_MODES:
        raise ValueError(
            f"--overwrite={overwrite}: expected --overwrite (moves the earlier run aside) or "
            "--overwrite=delete (deletes it)"
        )
    return overwrite


class RunDir:
    """Names every file of a run under `root` (`run_dir` in the config) and owns their lifecycle.

    A fresh (not resumed) run starts by clearing an earlier run's artifacts away (`prepare`); a
    resumed run keeps the JSONL rows of the steps its checkpoint covers.
    """

    METRICS = "metrics.jsonl"  # one row per learner step
    CONSUMED = "consumed.jsonl"  # provenance of every sample trained on
    PROBES = "probes.jsonl"  # each worker's post-load mismatch probe
    TIMELINE = "rollout_timeline.jsonl"  # per prompt group: when it was requested, generated, buffered
    CONFIG = "config.yaml"  # the job's whole config, as it ran (a resume writes its own)
    SAMPLES = "samples.jsonl"  # per step, the decoded highest-, lowest-reward and random responses
    TRACE = "trace.jsonl"  # spans of every actor's work (rlhf_cluster.telemetry.tracing; `rlhf-cluster trace` converts)
    BUFFER = "buffer.arrow"  # scored samples not yet trained on, at the end of a run
    SCORED_LOG = "scored"  # every scored group as it arrives (ScoredLog segments)
    RESUME = "resume.json"  # which checkpoint a resumed run started from
    EVAL = "eval.json"  # held-out accuracy before and after
    # Actions the run took on its own: guardrails (a best checkpoint kept, an early stop, a rollback:
    # rows of a step) and recoveries (a worker replaced, the learner rebuilt, a resume, a pool scaled,
    # failed rewards dropped: rows of a time, kept by every resume; `event`).
    EVENTS = "events.jsonl"
    RECEIPTS = "receipts.jsonl"  # every engine's answer to every weight load: the version and its proof
    # What the job's start writes under data/: the held-out split and the overlong prompts left out
    # (a user's file), or the built-in task's files.
    DATA_RECORDS = ("data/held_out.json", "data/overlong.json", "data/train.parquet", "data/eval.parquet")
    # What `rlhf-cluster plot`, `trace` and `replay` write by default, from the run's files.
    VIEWS = ("metrics.png", "trace.json", "replay")
    SCRAPE_TARGETS = "prometheus_targets.json"  # Prometheus file-based service discovery
    TENSORBOARD, WANDB, WANDB_ID = TENSORBOARD_DIR, WANDB_DIR, WANDB_ID  # the trackers' files (metrics.*)
    ENGINE_INT8 = "engine-int8"  # the int8 checkpoint generation engines start from
    JUDGE_INT8 = "judge-int8"  # the judge's int8 checkpoint (a judge with quantization: int8)
    REFERENCE = "reference"  # refreshed KL references, a folder per refresh (algorithm.kl.reference_refresh)
    # Inside a job checkpoint:
    DRIVER_STATE = "driver.json"
    CHECKPOINT_BUFFER = "buffer.arrow"
    CRITIC = "critic"  # the critic's rank checkpoints

    FULL_DISK_WAIT_S = FULL_DISK_WAIT_S  # how long an append waits for space on a full disk before it fails

    STEP_LOGS = (METRICS, CONSUMED, SAMPLES, EVENTS)
    JSONL_LOGS = (METRICS, CONSUMED, SAMPLES, EVENTS, PROBES, TIMELINE, TRACE, RECEIPTS)

    lock: RunLock | None  # the directory's lock, set by `acquire` (absent before), None after `release`

    def __init__(self, root: str | Path, weights_dir: Path, checkpoint_dir: Path):
        self.root = Path(root).expanduser()
        self.weights_dir = weights_dir
        self.checkpoint_dir = checkpoint_dir
        # Step logs' scans by `repair_logs`, so the resume's `keep_steps` need not read them again
        # (an hour of the soak's job: 235 MB of consumed.jsonl), each with the file's stat then.
        self._scans: dict[str, tuple[tuple[int, int, int], JsonlScan]] = {}

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    def acquire(self, job_name: str) -> RunDir:
        """Take the directory's lock (`RunDirBusy` while another job holds it); a second call is a no-op."""
        if getattr(self, "lock", None) is None:
            self.lock = RunLock(self.root, job_name)
        return self

    def prepare(self, fresh: bool, job_name: str, overwrite: bool | str | None = False) -> RunDir:
        """Take the directory's lock, then for a resumed run cut torn final lines off its logs,
        and for a fresh run clear an earlier run's artifacts away: refused unless `overwrite`
        (`RunDirInUse` names what is there), moved aside to `RUN_DIR.old-<time>` by default,
        deleted only with 'delete'."""
        mode = overwrite_mode(overwrite)
        self.acquire(job_name)
        if not fresh:
            self.repair_logs()
            return self
        if mode is None:
            self._refuse_an_earlier_run()
        stale = [p for p in self.artifacts(mode or "aside") if p.is_file() or (p.is_dir() and any(p.iterdir()))]
        if stale and mode == "delete":
            self.delete_paths(stale)
        elif stale:
            aside = self.set_aside(stale)
            log.warning(
                "run_dir %s: the earlier run's files were moved aside to %s (nothing deleted)", self.root, aside
            )
        return self

    def refusal(self, fresh: bool, overwrite: bool | str | None) -> str | None:
        """Why a job may not start here now, found by reading alone (nothing is taken or moved):
        another live job holds the directory, or a fresh start without `overwrite` would clear an
        earlier run. None when it may; `acquire` and `prepare` still decide, under the lock."""
        live = holder(self.root)
        # Only a holder on this host is known to be alive; one another host wrote may be a dead
        # job's (the flock itself, taken by `acquire`, decides there).
        if live is not None and live.get("host") == socket.gethostname():
            return in_use_message(self.root, live)
        return self._earlier_run() if fresh and overwrite_mode(overwrite) is None else None

    def complete(self, resume: str | None, total_steps: int) -> Checkpoint | None:
        """The checkpoint `resume` ('auto': the newest; or a path) would continue from when it holds
        step `total_steps` or later: nothing is left to train. Reads only. Only one that verifies
        counts: with a damaged newest one the job falls back to an older one and trains on."""
        if resume is None:
            return None
        if resume == "auto":
            found = CheckpointStore(self.checkpoint_dir).candidates()
            if not found:
                return None
            path = found[-1]
        else:
            path = Path(resume).expanduser()
        try:
            step = int(json.loads((path / MANIFEST).read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # not a checkpoint: the job's own checks say what is wrong
        if step + 1 < total_steps:
            return None
        try:
            return CheckpointStore.verify(path)
        except CheckpointError:
            return None

    def _earlier_run(self) -> str | None:
        """The refusal of a fresh start when the directory holds a run that trained or checkpointed."""
        try:
            trained = len(self.read(self.METRICS))
        except CorruptLogError:
            trained = -1  # damaged, but a run was there all the same
        checkpoints = self._checkpoint_names()
        if not (trained or checkpoints):
            return None
        return (
            f"run_dir {self.root} holds an earlier run ({trained if trained >= 0 else 'some'} steps in "
            f"{self.METRICS}{', checkpoints up to ' + checkpoints[-1] if checkpoints else ''}): continue it with "
            "--resume auto, or start over with --overwrite (moves it aside to "
            f"{self.root.name}.old-<time>; --overwrite=delete deletes it)"
        )

    def _refuse_an_earlier_run(self) -> None:
        """`RunDirInUse` (lock released) when the directory holds a run that trained or checkpointed."""
        message = self._earlier_run()
        if message is not None:
            self.release()
            raise RunDirInUse(message)

    def _checkpoint_names(self) -> list[str]:
        """Checkpoint directories, oldest first, those set aside as `refused-` included (they are the run's too)."""
        if not self.checkpoint_dir.is_dir():
            return []
        names = [p.name for p in self.checkpoint_dir.iterdir() if STEP_DIR.fullmatch(p.name.removeprefix("refused-"))]
        return sorted(names, key=lambda name: name.removeprefix("refused-"))

    def artifacts(self, mode: str) -> list[Path]:
        """What a fresh run clears away: the logs, records and views a job and `plot`/`trace`/`replay`
        write here (not its lock and scrape targets, rewritten at once, nor the stages' outputs `sft/`,
        `reward_model/` or an export); deleted (`mode` 'delete'), the earlier run's config stays until
        the new one writes its own."""
        names = [
            self.METRICS,
            self.CONSUMED,
            self.PROBES,
            self.BUFFER,
            self.RESUME,
            self.ENGINE_INT8,
            self.JUDGE_INT8,
            self.REFERENCE,
            self.TIMELINE,
            self.SCORED_LOG,
            self.TRACE,
            self.SAMPLES,
            self.EVENTS,
            self.TENSORBOARD,
            self.WANDB,
            self.WANDB_ID,
            self.RECEIPTS,
            self.EVAL,
            *self.DATA_RECORDS,
            *self.VIEWS,
            *((self.CONFIG,) if mode == "aside" else ()),
        ]
        return [self.weights_dir, self.checkpoint_dir, *(self.root / n for n in names)]

    @staticmethod
    def delete_paths(paths: list[Path]) -> None:
        for path in paths:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

    def set_aside(self, paths: list[Path]) -> Path:
        """Move `paths` into `RUN_DIR.old-<time>` (keeping their place in the run directory;
        weights or checkpoints kept elsewhere become `<dir>.old-<time>` beside themselves).
        A rename on one filesystem; a crash half way leaves every file in one place or the other."""
        root = Path(os.path.abspath(self.root))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = _unused(root.with_name(f"{root.name}.old-{stamp}"))
        for path in paths:
            path = Path(os.path.abspath(path))
            dest = (
                aside / path.relative_to(root)
                if path.is_relative_to(root)
                else _unused(path.with_name(f"{path.name}.old-{stamp}"))
            )
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), str(dest))
        for directory in (root, aside, root.parent):
            fsync_path(directory)
        return aside

    def release(self) -> None:
        """Let another job use the directory (also happens when this process exits)."""
        lock = getattr(self, "lock", None)
        if lock is not None:
            lock.release()
            self.lock = None

    def append(self, name: str, rows: list[dict], wait_s: float | None = None) -> None:
        """Append rows to a JSONL file of the run, whole or not at all. While the disk is full the
        append waits (the job pauses, with a warning) and tries again, up to `wait_s` (default
        `FULL_DISK_WAIT_S`); what a failed try wrote is cut off first, and the wait is recorded as a
        `disk_full` event."""
        path, text = self.root / name, "".join(json.dumps(row) + "\n" for row in rows)

        def attempt() -> None:
            size = path.stat().st_size if path.exists() else 0
            try:
                with open(path, "a") as fh:
                    fh.write(text)
            except OSError:
                if os.path.exists(path):
                    os.truncate(path, size)  # frees, so it works on a full disk too
                raise

        _, waited = wait_for_space(attempt, str(path), self.FULL_DISK_WAIT_S if wait_s is None else wait_s)
        if waited is not None and name != self.EVENTS:
            self.event("disk_full", file=name, waited_s=waited)

    def event(self, kind: str, **fields) -> None:
        """A recovery the run made (not tied to a step: every resume keeps it) as a row of events.jsonl."""
        self.append(self.EVENTS, [{"event": kind, "time": time.time(), **fields}])

    def failed(self, exc: BaseException) -> None:
        """The job ends with `exc`: one `failed` row of events.jsonl with its one-line cause
        (`failure_cause`), which `rlhf-cluster status` shows until a later start or resume. It does
        not wait for space on a full disk (that may be the failure): the job's end is not held up."""
        self.append(self.EVENTS, [{"event": FAILED, "time": time.time(), "error": failure_cause(exc)}], wait_s=0)

    def read(self, name: str) -> list[dict]:
        """The rows of a JSONL file of the run (none if it does not exist); a torn final line is
        left out, a damaged line before it is a `CorruptLogError` naming file and line."""
        return read_jsonl(self.root / name).rows

    def repair_logs(self) -> None:
        """Cut the torn final line a crash left in any JSONL log, with a warning, before a
        resumed run appends to it (an append after half a line would damage both); one
        streaming pass over each log, which also raises `CorruptLogError` for a line damaged
        otherwise."""
        for name in self.JSONL_LOGS:
            path = self.root / name
            if not path.exists():
                continue
            found = scan_jsonl(path)
            done = repair_jsonl(path, found)
            if done:
                log.warning(done)
            elif name in self.STEP_LOGS:
                self._scans[name] = (_stat(path), found)

    def write_json(self, name: str, value: dict | list) -> None:
        write_atomic(self.root / name, json.dumps(value, indent=1))

    def write_yaml(self, name: str, value: dict) -> None:
        import yaml

        write_atomic(self.root / name, yaml.safe_dump(value, sort_keys=False))

    def keep_steps(self, last_step: int) -> None:
        """Keep the step logs' rows of steps <= last_step, so a resumed run's logs continue the
        original's (rows of no step, the recoveries of `event`, stay). A log whose later steps are
        all at its end (as the step loop appends them) is cut in place, needing no room for a copy
        (an hour of the soak's job wrote 235 MB of consumed.jsonl); any other is rewritten. A log
        `repair_logs` scanned and nothing changed since is not read again."""
        for name in self.STEP_LOGS:
            path = self.root / name
            cut, size = None, 0
            if path.exists():
                stat, found = self._scans.pop(name, (None, None))
                if found is None or stat != _stat(path):
                    found = scan_jsonl(path)
                cut = _first_row_after(found, last_step) if found.torn_line is None else None
                size = found.size
            if cut is not None:  # every row from there on is of a later step: cut the file there, in place
                if cut < size:  # at its size: nothing after the step, nothing to write
                    os.truncate(path, cut)
                    fsync_path(path)
                continue
            rows = self.read(name)
            kept = (r for r in rows if r.get("step", -1) <= last_step)
            write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def _stat(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _first_row_after(found: JsonlScan, last_step: int) -> int | None:
    """The byte offset of the scanned file's first row of a step after `last_step` when every row
    from there on is of such a step (the file can be cut there); the file's size when no row is
    after `last_step` and it ends a whole line (nothing to cut: a resume from the checkpoint a
    SIGTERM wrote at the last step); None when rows to keep follow a later one, or the file ends in
    a partial line (it is rewritten)."""
    cut = None
    for offset, step in found.steps:
        if step > last_step:
            cut = offset if cut is None else cut
        elif cut is not None:
            return None  # a row to keep after the cut
    if cut is None and found.clean_end == found.size and not found.unterminated:
        return found.size
    return cut


def _unused(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... if it exists (two overwrites within a second)."""
    candidate, n = path, 2
    while candidate.exists():
        candidate, n = path.with_name(f"{path.name}-{n}"), n + 1
    return candidate
