"""Run untrusted Python (a policy's tool call) in a confined process. Ray-free.

`run_python(code, limits)` starts a fresh interpreter whose bootstrap confines itself before it
runs `code` (read from stdin), so nothing unsafe happens between fork and exec in the caller's
(threaded) process:

- a new network namespace: no interface but a down loopback, so no connection anywhere;
- a new PID namespace whose init (the code's process) is killed with the bootstrap: every
  process the code starts ends with it, even one that left its session; its own /proc (a new
  mount namespace), so no other process and no other process's environment is visible;
- as root, the code runs as `nobody` (65534) with no supplementary groups; unprivileged, in a
  new user namespace. Either way `RLIMIT_NPROC` caps its processes (a fork bomb hits the cap);
- rlimits: CPU seconds, address space (memory), file size, open files, no core dumps;
- Landlock: the filesystem is read-only except the private temporary directory (removed after);
- `no_new_privs`, an empty environment (no inherited secrets), `-I -S` (isolated, no site-packages:
  the standard library only);
- the caller enforces the wall time and the output cap, killing the whole confinement.

Every failure (a limit hit, a crash, an exception in the code, a confinement that cannot be set
up) comes back as `SandboxResult.error`, never as an exception to the caller: a tool error the
policy reads. Nothing runs unconfined: when a mechanism is missing, the code is not run.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one execution."""

    wall_s: float = 5.0  # the whole run, from start to the last byte of output
    cpu_s: int = 2  # per process (RLIMIT_CPU)
    memory_mb: int = 512  # address space per process (RLIMIT_AS)
    processes: int = 8  # processes of the sandbox's user at once (RLIMIT_NPROC)
    output_bytes: int = 8192  # stdout and stderr each; more ends the run
    file_mb: int = 16  # largest file it may write (RLIMIT_FSIZE)


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


# The confined process's own first steps (it cannot trust anything it inherits but its fds).
_BOOTSTRAP = r'''
import ctypes, os, resource, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
tmp, cpu_s, memory, nproc, fsize = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
code = sys.stdin.read()
def fail(what):
    sys.stderr.write(f"SANDBOX-SETUP: {what}: {os.strerror(ctypes.get_errno())}\n"); sys.stderr.flush(); os._exit(97)
CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID, CLONE_NEWNS = 0x10000000, 0x40000000, 0x20000000, 0x00020000
root = os.getuid() == 0
if libc.unshare(CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS | (0 if root else CLONE_NEWUSER)) != 0:
    fail("unshare(net, pid, mount)")
child = os.fork()
if child:
    _, status = os.waitpid(child, 0)
    if os.WIFEXITED(status):
        os._exit(os.WEXITSTATUS(status))
    # An exit status alone cannot tell `sys.exit(139)` from a SIGSEGV: a signal death is marked.
    sys.stderr.write(f"\nSANDBOX-SIGNAL: {os.WTERMSIG(status)}\n"); sys.stderr.flush()
    os._exit(128 + os.WTERMSIG(status))
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
# A /proc of this PID namespace only: no other process (the caller's environment) is visible.
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 16384, 1 << 18
if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
    fail("mount(private)")
if libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) != 0:
    fail("mount(proc)")
os.chdir(tmp)
if root:
    # `nobody` may not traverse the directory the interpreter lives in (e.g. /root/.pyenv): its
    # standard library is bind-mounted read-only inside the private directory for it.
    MS_RDONLY, MS_REMOUNT, MS_BIND = 1, 32, 4096
    view = os.path.join(tmp, ".python")
    os.mkdir(view)
    if libc.mount(sys.base_prefix.encode(), view.encode(), None, MS_BIND | MS_REC, None) != 0:
        fail("bind the interpreter")
    if libc.mount(None, view.encode(), None, MS_BIND | MS_REMOUNT | MS_RDONLY, None) != 0:
        fail("read-only interpreter")
    moved = lambda p: view + p[len(sys.base_prefix):] if p.startswith(sys.base_prefix) else p
    sys.path = [moved(p) for p in sys.path]
    for module in list(sys.modules.values()):  # packages imported already find their submodules there too
        if isinstance(getattr(module, "__path__", None), list):
            module.__path__[:] = [moved(p) for p in module.__path__]
    sys.path_importer_cache.clear()
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
for limit, value in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, memory), (resource.RLIMIT_NPROC, nproc),
                     (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
    fail("no_new_privs")
# Landlock: every write-like access is handled (denied) except beneath `tmp`.
abi = libc.syscall(444, None, 0, 1)
if abi < 1:
    fail("landlock")
write_access = (1 << 1) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12)
if abi >= 2: write_access |= 1 << 13  # REFER
if abi >= 3: write_access |= 1 << 14  # TRUNCATE
class RulesetAttr(ctypes.Structure): _fields_ = [("handled_access_fs", ctypes.c_uint64)]
class PathBeneath(ctypes.Structure): _pack_ = 1; _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]
attr = RulesetAttr(write_access)
ruleset = libc.syscall(444, ctypes.byref(attr), ctypes.sizeof(attr), 0)
if ruleset < 0:
    fail("landlock_create_ruleset")
fd = os.open(tmp, os.O_PATH | os.O_DIRECTORY)
rule = PathBeneath(write_access, fd)
if libc.syscall(445, ruleset, 1, ctypes.byref(rule), 0) != 0:
    fail("landlock_add_rule")
if libc.syscall(446, ruleset, 0) != 0:
    fail("landlock_restrict_self")
os.close(fd); os.close(ruleset)
del libc, ctypes, attr, rule
exec(compile(code, "<tool>", "exec"), {"__name__": "__main__"})
'''


def run_python(code: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `code` confined (see the module docstring); returns its output and its failure, if any."""
    tmp = tempfile.mkdtemp(prefix="rlhf-sandbox-")
    if os.getuid() == 0:
        os.chown(tmp, NOBODY, NOBODY)
    start = time.monotonic()
    args = [sys.executable, "-I", "-S", "-c", _BOOTSTRAP, tmp, str(limits.cpu_s), str(limits.memory_mb << 20),
            str(limits.processes), str(limits.file_mb << 20)]
    try:
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={}, cwd=tmp, start_new_session=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        return SandboxResult("", "", f"sandbox did not start: {exc}", 0.0)
    try:
        out, err, cut = _communicate(proc, code.encode(), limits, start)
    finally:
        _kill(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.monotonic() - start
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    return SandboxResult(stdout, stderr, cut or _failure(proc.returncode, stderr, limits), seconds)


def _communicate(proc: subprocess.Popen, code: bytes, limits: SandboxLimits, start: float) -> tuple[bytes, bytes, str | None]:
    """Feed the code, collect output until exit, the wall time or the output cap."""
    try:
        proc.stdin.write(code)
        proc.stdin.close()
    except BrokenPipeError:
        pass
    buffers = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    with selectors.DefaultSelector() as sel:
        for pipe in buffers:
            sel.register(pipe, selectors.EVENT_READ)
        while sel.get_map():
            left = limits.wall_s - (time.monotonic() - start)
            if left <= 0:
                return bytes(buffers[proc.stdout]), bytes(buffers[proc.stderr]), f"timed out after {limits.wall_s:g} s"
            for key, _ in sel.select(timeout=left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = buffers[key.fileobj]
                buf += chunk
                if len(buf) > limits.output_bytes:
                    del buf[limits.output_bytes:]
                    return bytes(buffers[proc.stdout]), bytes(buffers[proc.stderr]), \
                        f"output over {limits.output_bytes} bytes (truncated)"
    try:
        proc.wait(timeout=max(0.1, limits.wall_s - (time.monotonic() - start)))
    except subprocess.TimeoutExpired:
        return bytes(buffers[proc.stdout]), bytes(buffers[proc.stderr]), f"timed out after {limits.wall_s:g} s"
    return bytes(buffers[proc.stdout]), bytes(buffers[proc.stderr]), None


def _kill(proc: subprocess.Popen) -> None:
    """End the bootstrap's session; its PID namespace (every process the code started) dies with it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        pipe.close()


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
        number = last_line[len(_SIGNAL_MARK):].strip()
        if number.isdigit() and returncode == 128 + int(number):
            return int(number)
    return None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal, or one this platform does not name
        return f"signal {number}"
