"""`fileio.scratch_dir`: a process's scratch folder goes when the process exits, and what a
SIGKILLed process left is removed by the next one on the host, never a live process's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from rlhf_cluster.fileio import scratch_dir
from rlhf_cluster.generation.adapter_library import AdapterLibrary

_MAKE = textwrap.dedent(
    """
    import sys, time
    from rlhf_cluster.fileio import scratch_dir
    path = scratch_dir("probe", sys.argv[1])
    (path / "payload").write_text("x")
    print(path, flush=True)
    if sys.argv[2] == "wait":
        time.sleep(600)
    """
)


def _start(root: Path, mode: str) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", _MAKE, str(root), mode], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_a_normal_exit_removes_the_folder(tmp_path):
    proc, path = _start(tmp_path, "exit")
    assert proc.wait(timeout=60) == 0
    assert path.name.startswith("probe-") and str(os.getpid()) not in path.name
    assert not path.exists()


def test_a_killed_process_folder_goes_at_the_next_start_and_a_live_one_stays(tmp_path):
    killed, left = _start(tmp_path, "wait")
    live, kept = _start(tmp_path, "wait")
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
        assert (left / "payload").exists()  # SIGKILL runs no cleanup
        other = scratch_dir("probe-other", tmp_path)  # another prefix sweeps nothing of "probe"
        assert left.exists()
        mine = scratch_dir("probe", tmp_path)
        assert not left.exists()
        assert (kept / "payload").exists()
        assert mine.is_dir() and other.is_dir() and f"-{os.getpid()}-" in mine.name
    finally:
        live.kill()
        live.wait(timeout=60)


def test_the_adapter_library_keeps_its_copies_in_a_scratch_folder(tmp_path):
    library = AdapterLibrary(max_rank=8, max_loras=2, root=str(tmp_path))
    assert library.root.parent == tmp_path
    assert library.root.name.startswith("adapter-library-") and f"-{os.getpid()}-" in library.root.name
    library.close()
    assert not library.root.exists()
