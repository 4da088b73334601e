"""`--max-retries`: a driver that dies is started again with --resume auto; a clean end, a refusal
or a requested stop is final."""

from __future__ import annotations

import sys
from pathlib import Path

from actors.commands.supervisor import supervise

# A stand-in driver: records its arguments, then exits with the next code of a list.
DRIVER = """
import json, sys
from pathlib import Path
log = Path(sys.argv[1])
runs = json.loads(log.read_text()) if log.exists() else []
runs.append(sys.argv[3:])
log.write_text(json.dumps(runs))
sys.exit(int(sys.argv[2].split(",")[len(runs) - 1]))
"""


def _run(tmp_path: Path, codes: str, retries: int, *args: str) -> tuple[int, list, list[str]]:
    script, log, lines = tmp_path / "driver.py", tmp_path / "runs.json", []
    script.write_text(DRIVER)
    rc = supervise([sys.executable, str(script), str(log), codes, *args], retries, lines.append)
    import json

    return rc, json.loads(log.read_text()), lines


def test_a_dead_driver_is_resumed_until_it_finishes(tmp_path):
    rc, runs, lines = _run(tmp_path, "3,1,0", 3, "job.yaml", "--overwrite", "--resume", "ckpt-7")
    assert rc == 0
    assert runs == [["job.yaml", "--overwrite", "--resume", "ckpt-7"], ["job.yaml", "--resume", "auto"],
                    ["job.yaml", "--resume", "auto"]]
    assert lines[0] == "driver exited with 3; resuming from the newest checkpoint (retry 1 of 3)"


def test_retries_run_out_and_final_exits_are_not_retried(tmp_path):
    rc, runs, _ = _run(tmp_path, "1,1,1", 1, "job.yaml")
    assert rc == 1 and len(runs) == 2
    for code in ("2", "130"):  # refused input, torn down on request
        (tmp_path / "runs.json").unlink()
        rc, runs, _ = _run(tmp_path, code, 5, "job.yaml")
        assert rc == int(code) and len(runs) == 1
