"""Run untrusted Python (a policy's tool call) in a confined process. Ray-free.

`run_python(code, limits)` starts a fresh interpreter whose bootstrap (`sandbox_child.py`) confines itself before it
runs `code` (read from stdin), so nothing unsafe happens between fork and exec in the caller's
(threaded) process. Layers, each stopping something the others do not:

- namespaces: a new network namespace (no interface but a down loopback: no connection anywhere,
  no abstract unix socket of the host), IPC namespace (SysV shared memory, semaphores and message
  queues die with the call; `shmall`/`shmmax` capped at `tmp_mb`), UTS namespace, and PID
  namespace whose init (the code's process) is killed with the bootstrap and by the caller by pid:
  every process the code starts ends with the call, even one that left its session;
- a private filesystem view (a new mount namespace, `pivot_root` into a tmpfs): only the system
  libraries (`/usr`, `/lib*`), the interpreter's installation, a few `/etc` files the loader reads,
  `/dev/{null,zero,full,random,urandom}` and its own `/proc`, all read-only; `/tmp` (the working
  directory) and `/dev/shm` are fresh tmpfs capped at `tmp_mb` each. The caller's run directory,
  the checkout, host sockets and other calls' files are not in the view at all;
- as root, the code runs as a uid of its own (`UID_BASE` + a slot held for the call's duration,
  no supplementary groups): concurrent calls cannot signal or read each other, and `RLIMIT_NPROC`
  caps each call's processes separately (a fork bomb hits the cap). Unprivileged, it runs in a new
  user namespace mapping only the caller's uid, with every capability dropped;
- rlimits: CPU seconds, address space (memory), file size, open files, no core dumps;
- Landlock (required): reads, executes and writes are allowed only beneath the paths of the view
  above (writes only in `/tmp` and `/dev/shm`); where the kernel offers them, TCP bind/connect are
  denied (ABI 4) and abstract unix sockets and signals are scoped to the call (ABI 6);
- seccomp (required; x86_64 and aarch64): a deny-list of kernel interfaces the code has no use for
  (`ptrace`, `mount`, `unshare`/`setns`/namespace `clone`, `bpf`, `perf_event_open`, `keyctl`,
  `io_uring`, module and kexec calls, clearing the parent-death signal, ...);
- `no_new_privs`, an empty environment (no inherited secrets), `-I -S` (isolated, no site-packages:
  the standard library only);
- the caller enforces the wall time and the output cap, killing the whole confinement.

Every failure (a limit hit, a crash, an exception in the code, a confinement that cannot be set
up) comes back as `SandboxResult.error`, never as an exception to the caller: a tool error the
policy reads. Nothing runs unconfined: when a mechanism is missing, the code is not run. What the
layers do not stop is written in docs/operations.md ("Security model").
"""

from __future__ import annotations

import fcntl
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

NOBODY = 65534
# Root mode: each concurrent call runs as UID_BASE + a free slot (gid likewise), a range no
# account uses; the slot is held by an flock on /run/rlhf-sandbox/uid-<slot> for the call.
UID_BASE = 2_000_000_000
UID_SLOTS = 4096
_SLOT_DIR = "/run/rlhf-sandbox"


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one execution."""

    wall_s: float = 5.0  # the whole run, from start to the last byte of output
    cpu_s: int = 2  # per process (RLIMIT_CPU)
    memory_mb: int = 512  # address space per process (RLIMIT_AS)
    processes: int = 8  # processes of the sandbox's user at once (RLIMIT_NPROC)
    output_bytes: int = 8192  # stdout and stderr each; more ends the run
    file_mb: int = 16  # largest file it may write (RLIMIT_FSIZE)
    tmp_mb: int = 64  # /tmp, /dev/shm (tmpfs, in memory) and SysV shared memory: each at most this


@dataclass
class SandboxResult:
    """What the code printed, and why it failed (None when it exited 0)."""

    stdout: str
    stderr: str
    error: str | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.error is None


# The confined process's own program (`sandbox_child.py` beside this file), run as `python -I -S -c
# <its text>`: read once here, so the child needs nothing from the caller's tree but its arguments.
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")) as _program:
    _BOOTSTRAP = _program.read()


def run_python(code: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `code` confined (see the module docstring); returns its output and its failure, if any."""
    start = time.monotonic()
    slot = None
    try:
        # An empty directory for the bootstrap to mount its root on (in its own mount namespace:
        # nothing appears here on the host).
        mnt = tempfile.mkdtemp(prefix="rlhf-sandbox-")
    except OSError as exc:
        return SandboxResult("", "", f"sandbox did not start: {exc}", 0.0)
    try:
        uid = -1
        if os.getuid() == 0:
            uid, slot = _claim_uid()
        args = [
            sys.executable,
            "-I",
            "-S",
            "-c",
            _BOOTSTRAP,
            mnt,
            str(limits.cpu_s),
            str(limits.memory_mb << 20),
            str(limits.processes),
            str(limits.file_mb << 20),
            str(limits.tmp_mb << 20),
            str(uid),
        ]
        proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={},
            cwd="/",
            start_new_session=True,
        )
    except OSError as exc:
        _release(mnt, slot)
        return SandboxResult("", "", f"sandbox did not start: {exc}", 0.0)
    try:
        out, err, cut = _communicate(proc, code.encode(), limits, start)
    finally:
        _kill(proc)
        _release(mnt, slot)
    seconds = time.monotonic() - start
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    return SandboxResult(stdout, stderr, cut or _failure(proc.returncode, stderr, limits), seconds)


def _claim_uid() -> tuple[int, int]:
    """A uid no other call (of any process on this host) runs as now, and the fd of the lock that
    holds it: `flock` on one file per slot, released by closing the fd (or by the caller's death)."""
    os.makedirs(_SLOT_DIR, mode=0o700, exist_ok=True)
    for slot in range(UID_SLOTS):
        fd = os.open(
            os.path.join(_SLOT_DIR, f"uid-{slot}"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return UID_BASE + slot, fd
    raise OSError(f"all {UID_SLOTS} sandbox uids are in use")


def _release(mnt: str, slot: int | None) -> None:
    """Remove the mount point and free the uid (after the call's processes are dead)."""
    shutil.rmtree(mnt, ignore_errors=True)
    if slot is not None:
        os.close(slot)


def _communicate(
    proc: subprocess.Popen[bytes], code: bytes, limits: SandboxLimits, start: float
) -> tuple[bytes, bytes, str | None]:
    """Feed the code, collect output until exit, the wall time or the output cap."""
    stdin, stdout, stderr = proc.stdin, proc.stdout, proc.stderr
    if stdin is None or stdout is None or stderr is None:
        raise RuntimeError("the sandbox process must be started with stdin, stdout and stderr pipes")
    try:
        stdin.write(code)
        stdin.close()
    except BrokenPipeError:
        pass
    out, err = bytearray(), bytearray()
    buffers = {stdout.fileno(): out, stderr.fileno(): err}  # by fd, as the selector's keys name them
    with selectors.DefaultSelector() as sel:
        for pipe in (stdout, stderr):
            sel.register(pipe, selectors.EVENT_READ)
        while sel.get_map():
            left = limits.wall_s - (time.monotonic() - start)
            if left <= 0:
                return bytes(out), bytes(err), f"timed out after {limits.wall_s:g} s"
            for key, _ in sel.select(timeout=left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = buffers[key.fd]
                buf += chunk
                if len(buf) > limits.output_bytes:
                    del buf[limits.output_bytes :]
                    return (
                        bytes(out),
                        bytes(err),
                        f"output over {limits.output_bytes} bytes (truncated)",
                    )
    try:
        proc.wait(timeout=max(0.1, limits.wall_s - (time.monotonic() - start)))
    except subprocess.TimeoutExpired:
        return bytes(out), bytes(err), f"timed out after {limits.wall_s:g} s"
    return bytes(out), bytes(err), None


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """End the confinement: the code's process (the PID namespace's init: every process the code
    started dies with it) by pid, since it may have left the bootstrap's session (`os.setsid()`),
    then the bootstrap's session."""
    if proc.poll() is None:
        for pid in _children(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (not yet reaped by it, so their pids are still theirs)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:  # a kernel without CONFIG_PROC_CHILDREN: every process's parent, from /proc
        found = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
        return found


def _failure(returncode: int, stderr: str, limits: SandboxLimits) -> str | None:
    """Why the run failed, from its exit status and stderr; any status (0-255, or a signal) gives
    a message, never an exception: the code chooses its own status (`os._exit(255)`)."""
    if returncode == 0:
        return None
    if returncode == 97 and "SANDBOX-SETUP:" in stderr:
        return "sandbox unavailable: " + stderr.split("SANDBOX-SETUP:", 1)[1].strip().splitlines()[0]
    lines = stderr.strip().splitlines()
    number = _signal_number(returncode, lines[-1] if lines else "")
    if number is not None:
        name = _signal_name(number)
        if number in (signal.SIGXCPU, signal.SIGKILL):
            return f"killed ({name}; cpu limit {limits.cpu_s} s)"
        return f"crashed ({name})"
    last = lines[-1] if lines else ""
    if "MemoryError" in last:
        return f"out of memory (limit {limits.memory_mb} MB)"
    return last or f"exited with status {returncode}"


_SIGNAL_MARK = "SANDBOX-SIGNAL: "


def _signal_number(returncode: int, last_line: str) -> int | None:
    """The signal that ended the code, or None when it exited: the bootstrap was signalled itself
    (a negative status), or its last stderr line marks the code's signal death (status 128 + n)."""
    if returncode < 0:
        return -returncode
    if last_line.startswith(_SIGNAL_MARK):
        number = last_line[len(_SIGNAL_MARK) :].strip()
        if number.isdigit() and returncode == 128 + int(number):
            return int(number)
    return None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal, or one this platform does not name
        return f"signal {number}"
