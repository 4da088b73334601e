"""Driver retries: `rlhf-cluster train --max-retries N` (and `submit --max-retries N`) runs the
driver as a child process and, when it dies (killed, out of memory, a crash: any exit other than
0, 2 = refused input or 130 = torn down on request), starts it again with `--resume auto`, up to
N times. SIGTERM and SIGINT sent to the supervisor are passed to the driver once, which stops
gracefully; the supervisor then returns the driver's exit code and retries nothing."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable

FINAL = {0, 2, 130}  # done or stopped with a checkpoint; refused input; torn down on request


def supervise(argv: list[str], max_retries: int, echo: Callable[[str], None]) -> int:
    """Run `argv` (a `train` command line without --resume/--overwrite on retries) to the end."""
    child: subprocess.Popen | None = None
    stopping = False

    def forward(signum: int, frame) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        command, attempt = argv, 0
        while True:
            # Its own session: a terminal's Ctrl-C or a scheduler's group signal reaches the
            # driver once, through `forward`, not twice.
            child = subprocess.Popen(command, start_new_session=True)
            rc = child.wait()
            if rc in FINAL or stopping or attempt >= max_retries:
                return rc
            attempt += 1
            echo(f"driver exited with {rc}; resuming from the newest checkpoint (retry {attempt} of {max_retries})")
            command = _resuming(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _resuming(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif arg != "--overwrite" and not arg.startswith("--overwrite="):
            out.append(arg)
    return out + ["--resume", "auto"]
