"""A resume reads each JSONL log once, streaming (the soak's hour: a 235 MB consumed.jsonl, 1.3M
rows, was read whole twice, by `repair_logs` and again by `keep_steps`, ~1 GB of rows in memory):
`scan_jsonl` checks a log as `read_jsonl` does without keeping its rows, and `keep_steps` cuts
with `repair_logs`' scan when the log has not changed since."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_cluster.fileio import CorruptLogError, read_jsonl, scan_jsonl
from rlhf_cluster.run import run_dir as run_dir_module
from rlhf_cluster.run.run_dir import RunDir

ROWS = "".join(json.dumps({"step": s, "i": i}) + "\n" for s in range(3) for i in range(2))
CASES = {
    "whole": ROWS,
    "empty": "",
    "blank lines": "\n" + ROWS + "\n  \n",
    "torn final line": ROWS + '{"step": 3, "i',
    "torn, then blanks": ROWS + '{"step": 3, "i\n \n',
    "NUL blocks": ROWS + "\0" * 64,
    "no final newline": ROWS.rstrip("\n"),
    "a JSON list last": ROWS + "[1, 2]\n",
    "damaged mid-file": ROWS + '{"step": 3, "i"\n' + ROWS,
    "a JSON list mid-file": "[1]\n" + ROWS,
}


@pytest.mark.parametrize("text", CASES.values(), ids=CASES.keys())
def test_scan_finds_what_read_finds(tmp_path, text):
    path = tmp_path / "log.jsonl"
    path.write_text(text)
    try:
        read = read_jsonl(path)
    except CorruptLogError as exc:
        with pytest.raises(CorruptLogError) as scanned:
            scan_jsonl(path)
        assert str(scanned.value) == str(exc)
        return
    scan = scan_jsonl(path)
    assert (scan.clean_end, scan.size, scan.torn_line) == (read.clean_end, read.size, read.torn_line)
    assert scan.size == len(text.encode())
    # The last row lost its newline exactly when the byte before the clean end is not one.
    assert scan.unterminated == (scan.clean_end > 0 and text.encode()[scan.clean_end - 1 : scan.clean_end] != b"\n")
    assert scan.unterminated == (text == CASES["no final newline"])
    # One entry where a row's step differs from the row before, at the row's byte offset.
    starts = [offset for offset in range(len(text)) if offset == 0 or text[offset - 1] == "\n"]
    for offset, step in scan.steps:
        assert offset in starts and json.loads(text[offset:].split("\n", 1)[0])["step"] == step
    assert [step for _, step in scan.steps] == sorted({r["step"] for r in read.rows})


def test_a_missing_log_scans_empty(tmp_path):
    scan = scan_jsonl(tmp_path / "absent.jsonl")
    assert (scan.clean_end, scan.size, scan.torn_line, scan.steps, scan.unterminated) == (0, 0, None, [], False)


def _a_run(root: Path, steps: int) -> RunDir:
    root.mkdir()
    for name in (RunDir.METRICS, RunDir.CONSUMED, RunDir.SAMPLES):
        (root / name).write_text("".join(json.dumps({"step": s, "n": n}) + "\n" for s in range(steps) for n in range(3)))
    (root / RunDir.EVENTS).write_text(json.dumps({"event": "resumed", "time": 1.0}) + "\n")
    return RunDir(root, root / "weights", root / "checkpoints")


def test_a_resume_reads_each_step_log_once_and_cuts_it_where_the_checkpoint_ends(tmp_path, monkeypatch):
    run = _a_run(tmp_path / "run", steps=10)
    scanned: list[str] = []
    real = run_dir_module.scan_jsonl
    monkeypatch.setattr(run_dir_module, "scan_jsonl", lambda path: scanned.append(path.name) or real(path))

    run.prepare(fresh=False, job_name="resumed")  # repair_logs: every log, once
    run.event("resumed", from_step=6)  # events.jsonl changes before the cut: it is read again
    run.keep_steps(6)
    assert sorted(scanned) == sorted([RunDir.METRICS, RunDir.CONSUMED, RunDir.SAMPLES, RunDir.EVENTS, RunDir.EVENTS])
    for name in (RunDir.METRICS, RunDir.CONSUMED, RunDir.SAMPLES):
        assert [r["step"] for r in run.read(name)] == [s for s in range(7) for _ in range(3)], name
    assert [e["event"] for e in run.read(RunDir.EVENTS)] == ["resumed", "resumed"]
    run.release()


def test_a_log_that_changed_after_its_scan_is_scanned_again(tmp_path):
    run = _a_run(tmp_path / "run", steps=4)
    run.prepare(fresh=False, job_name="resumed")
    run.append(RunDir.CONSUMED, [{"step": 4, "n": 0}, {"step": 2, "n": 9}])  # a kept row after a later one
    run.keep_steps(2)
    assert [(r["step"], r["n"]) for r in run.read(RunDir.CONSUMED)] == (
        [(s, n) for s in range(3) for n in range(3)] + [(2, 9)]
    ), "cut by the stale scan, the kept row (2, 9) would be lost"
    run.release()


def test_a_resume_from_the_last_step_leaves_the_step_logs_as_they_are(tmp_path, monkeypatch):
    """A SIGTERM checkpoints at the step it stopped after, so its resume has nothing to cut: the
    logs were read whole and rewritten through a copy (11 s at 10,000 steps of the soak's job)."""
    run = _a_run(tmp_path / "run", steps=5)
    before = {name: (run.root / name).stat().st_ino for name in (RunDir.METRICS, RunDir.CONSUMED, RunDir.SAMPLES)}
    monkeypatch.setattr(run_dir_module, "write_atomic", lambda *a: pytest.fail(f"rewrote {a[0]}"))
    run.prepare(fresh=False, job_name="resumed")
    run.keep_steps(4)
    for name, inode in before.items():
        assert (run.root / name).stat().st_ino == inode, name
        assert [r["step"] for r in run.read(name)] == [s for s in range(5) for _ in range(3)], name
    run.release()


def test_a_final_row_without_its_newline_is_still_rewritten_when_nothing_is_cut(tmp_path):
    run = _a_run(tmp_path / "run", steps=2)
    path = run.root / RunDir.CONSUMED
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    run.keep_steps(1)  # no repair before it (a rollback's cut): the rewrite ends the last row
    run.append(RunDir.CONSUMED, [{"step": 2, "n": 0}])
    assert [r["step"] for r in run.read(RunDir.CONSUMED)] == [0, 0, 0, 1, 1, 1, 2]
