"""The Python tool's sandbox against hostile code: each snippet is contained within its limit and
comes back as a tool error, and the caller (here the test process, in a job the generation
worker) carries on. Real processes, real limits: nothing is mocked."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid

import pytest

from rlhf_cluster.tools.calls import ToolCall, run_tool
from rlhf_cluster.tools.sandbox import NOBODY, UID_BASE, UID_SLOTS, SandboxLimits, run_python

LIMITS = SandboxLimits(wall_s=4.0, cpu_s=1, memory_mb=256, processes=8, output_bytes=4096)


def _sandbox_processes() -> int:
    """Processes of any sandbox uid (root mode) on the host."""
    count = 0
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/status") as f:
                uid = int(next(line for line in f if line.startswith("Uid:")).split()[1])
        except (OSError, StopIteration, ValueError):
            continue
        count += UID_BASE <= uid < UID_BASE + UID_SLOTS or uid == NOBODY
    return count


def _marked_processes(marker: str) -> list[int]:
    """Host processes whose command line or environment holds `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        for part in ("cmdline", "environ"):
            try:
                with open(f"/proc/{entry}/{part}", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(entry))
                        break
            except OSError:
                continue
    return found


def _world_readable_dir() -> str:
    """A host directory any uid may enter and read (like a run directory made with umask 022)."""
    path = tempfile.mkdtemp(prefix="rlhf-sandbox-test-")
    os.chmod(path, 0o755)
    return path


def test_benign_code_runs_and_an_exception_is_a_tool_error():
    ok = run_python("print(sum(range(10)))", LIMITS)
    assert ok.ok and ok.stdout == "45\n"
    bad = run_python("raise ValueError('no such column')", LIMITS)
    assert not bad.ok and bad.error == "ValueError: no such column"


def test_infinite_loop_is_stopped_by_the_cpu_limit():
    r = run_python("while True:\n    pass", LIMITS)
    assert not r.ok and "cpu limit" in r.error and r.seconds < LIMITS.wall_s + 1


def test_fork_bomb_hits_the_process_cap_and_dies_with_the_sandbox():
    before = _sandbox_processes() if os.getuid() == 0 else 0
    # Eight spinning processes share the cores until the wall limit ends them: 2 s of it is enough.
    limits = dataclasses.replace(LIMITS, wall_s=2.0)
    r = run_python("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", limits)
    assert not r.ok and r.seconds < limits.wall_s + 2
    if os.getuid() == 0:  # as root the sandbox runs as a uid of its own: its PID namespace is torn down with it
        deadline = time.monotonic() + 5
        while _sandbox_processes() > before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _sandbox_processes() <= before, "processes of the fork bomb outlived the sandbox"


def test_ten_gigabytes_is_refused_by_the_memory_limit():
    r = run_python("x = bytearray(10 * 1024 ** 3)\nprint(len(x))", LIMITS)
    assert not r.ok and "out of memory" in r.error and r.stdout == ""


def test_no_network_not_even_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    r = run_python(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')", LIMITS)
    # The sandbox has ended: a connection it made was completed by the kernel and waits in the
    # listen queue, so one accept after the call sees it (no thread waiting out a timeout).
    server.settimeout(0.5)
    accepted = [_accept(server)]
    server.close()
    # Refused by Landlock (ABI 4: "permission denied") or, on an older kernel, by the empty network namespace.
    assert not r.ok and "connected" not in r.stdout, r.error
    assert "unreachable" in r.error.lower() or "permission denied" in r.error.lower(), r.error
    assert accepted == [None], "the sandbox reached the caller's server"


def _accept(server):
    try:
        conn, _ = server.accept()
        conn.close()
        return "connection"
    except OSError:
        return None


def test_the_callers_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("RLHF_SECRET_TOKEN", "s3cret-value")
    code = (f"import os\nprint(dict(os.environ))\n"
            f"try:\n    print(open('/proc/{os.getpid()}/environ', 'rb').read())\nexcept OSError as e:\n    print('denied', e)\n"
            f"try:\n    print(open('/proc/1/environ', 'rb').read())\nexcept OSError as e:\n    print('denied', e)")
    r = run_python(code, LIMITS)
    assert r.ok, r.error
    assert "s3cret-value" not in r.stdout and "RLHF_SECRET_TOKEN" not in r.stdout


def test_nothing_is_written_outside_its_temporary_directory(tmp_path):
    # /tmp is the call's own tmpfs: a write there succeeds but never reaches the host's /tmp; the
    # system directories are read-only; the caller's files are not in the view at all.
    outside = f"/tmp/rlhf-sandbox-escape-{uuid.uuid4().hex}"
    mine = tmp_path / "owned-by-the-caller.txt"
    mine.write_text("keep")
    code = (f"open('inside.txt', 'w').write('fine')\nprint(open('inside.txt').read())\n"
            f"open({outside!r}, 'w').write('x')\n"
            f"for path in ('/usr/escape.txt', '/etc/escape.txt', '/escape.txt', {str(mine)!r}):\n"
            f"    try:\n        open(path, 'w').write('x')\n        print('WROTE', path)\n"
            f"    except OSError as e:\n        print('refused', type(e).__name__)")
    r = run_python(code, LIMITS)
    assert r.ok, r.error
    assert r.stdout.startswith("fine") and "WROTE" not in r.stdout and r.stdout.count("refused") == 4
    assert not os.path.exists(outside) and mine.read_text() == "keep"
    assert not any(os.path.exists(p) for p in ("/usr/escape.txt", "/etc/escape.txt", "/escape.txt"))


def test_deep_recursion_is_an_error_not_a_hang():
    r = run_python("import sys\nsys.setrecursionlimit(10 ** 8)\ndef f(n):\n    return f(n + 1) + 1\nf(0)", LIMITS)
    assert not r.ok and r.seconds < LIMITS.wall_s + 1


def test_an_output_flood_is_cut_at_the_cap():
    r = run_python("while True:\n    print('x' * 1000)", LIMITS)
    assert not r.ok and "output over 4096 bytes" in r.error and len(r.stdout) <= 4096


# Any exit status the code picks, and a real signal death, is a tool error, never an exception
# (issue 34: `raise SystemExit(200)` and `os._exit(255)` used to raise ValueError in the caller).
@pytest.mark.parametrize("code, error", [
    ("raise SystemExit(200)", "exited with status 200"),
    ("import os\nos._exit(255)", "exited with status 255"),
    ("import sys\nsys.exit(139)", "exited with status 139"),  # was reported as a SIGSEGV
])
def test_any_exit_status_is_a_tool_error(code, error):
    r = run_python(code, LIMITS)
    assert not r.ok and r.error == error and r.seconds < LIMITS.wall_s + 1
    result = run_tool(ToolCall("python", code), LIMITS)
    assert result.observation() == f'<error name="python">{error}</error>'


def test_a_signal_death_is_still_a_crash_naming_the_signal():
    code = "import ctypes\nctypes.string_at(0)"  # the kernel's SIGSEGV: even the namespace's PID 1 dies of it
    r = run_python(code, LIMITS)
    assert not r.ok and r.error == "crashed (SIGSEGV)"
    assert run_tool(ToolCall("python", code), LIMITS).observation() == '<error name="python">crashed (SIGSEGV)</error>'


# --- Issue 34: escapes a hostile policy tried. Each test fails on the sandbox before the fix. ---

# The code's own process (the PID namespace's init) leaves the bootstrap's session and outlives the
# wall time; or a double-forked grandchild in a new session outlives its parent's clean exit.
_SETSID_CODE = {
    "init leaves the session": ("import os\nos.setsid()\n"
                                "if os.fork() == 0:\n    os.setsid()\n    if os.fork():\n        os._exit(0)\n"
                                "    os.execve('/usr/bin/sleep', ['sleep', '60'], {{'MARK': {marker!r}}})\n"
                                "os.execve('/usr/bin/sleep', ['sleep', '60'], {{'MARK': {marker!r}}})"),
    "double fork, init exits": ("import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork():\n        os._exit(0)\n"
                                "    os.execve('/usr/bin/sleep', ['sleep', '60'], {{'MARK': {marker!r}}})\n"
                                "import time\ntime.sleep(0.3)\nprint('parent done')"),
}


@pytest.mark.parametrize("case", sorted(_SETSID_CODE))
def test_no_process_outlives_the_call(case):
    marker = f"rlhf-sandbox-survivor-{uuid.uuid4().hex}"
    try:
        r = run_python(_SETSID_CODE[case].format(marker=marker), SandboxLimits(wall_s=1.5, cpu_s=1, memory_mb=256))
        assert r.seconds < 3, r
        deadline = time.monotonic() + 3
        while _marked_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _marked_processes(marker) == [], f"{case}: a process of the call is still alive"
    finally:
        for pid in _marked_processes(marker):  # never leave a survivor behind, even when the test fails
            os.kill(pid, signal.SIGKILL)


_SHMGET = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
           "def shmget(key, size, flags):\n    r = libc.shmget(key, ctypes.c_size_t(size), flags)\n"
           "    return r, ctypes.get_errno()\n")


def _host_shm_keys() -> set[int]:
    with open("/proc/sysvipc/shm") as f:
        return {int(line.split()[0]) for line in list(f)[1:]}


def test_sysv_shared_memory_dies_with_the_call_and_is_capped():
    key = 0x5A000000 | (uuid.uuid4().int & 0xFFFFFF)
    try:
        first = run_python(_SHMGET + f"print(*shmget({key}, 1 << 20, 0o1666))", LIMITS)  # IPC_CREAT | 0666
        assert first.ok and int(first.stdout.split()[0]) >= 0, (first.stdout, first.error)
        assert key not in _host_shm_keys(), "the call's segment is in the host's IPC namespace"
        second = run_python(_SHMGET + f"print(*shmget({key}, 0, 0))", LIMITS)
        assert second.ok and second.stdout.split() == ["-1", "2"], second.stdout  # ENOENT: gone with the first call
        # Unattached segments count against no rlimit: the namespace's shmmax/shmall (tmp_mb) do.
        cap = run_python(_SHMGET + "made = 0\nfor _ in range(24):\n"
                         "    if shmget(0, 32 << 20, 0o1600)[0] < 0:\n        break\n    made += 1\n"
                         "print(made, shmget(0, 768 << 20, 0o1600)[0])", LIMITS)
        made, big = map(int, cap.stdout.split())
        assert made * 32 <= SandboxLimits().tmp_mb and big == -1, cap.stdout
    finally:
        if key in _host_shm_keys():
            subprocess.run(["ipcrm", "-M", str(key)], check=False)


def test_posix_shared_memory_is_private_and_capped():
    name = f"rlhf-sandbox-test-{uuid.uuid4().hex}"
    try:
        first = run_python(f"import _posixshmem, os\nfd = _posixshmem.shm_open('/{name}', os.O_CREAT | os.O_RDWR, 0o666)\n"
                           f"os.write(fd, b'hello')\nprint('created')", LIMITS)
        assert first.ok and first.stdout == "created\n", first.error
        assert not os.path.exists(f"/dev/shm/{name}"), "the call's segment is in the host's /dev/shm"
        second = run_python(f"import _posixshmem, os\n_posixshmem.shm_open('/{name}', os.O_RDWR, 0)", LIMITS)
        assert not second.ok and "FileNotFoundError" in second.error
        # Each segment under the file-size limit, all together over /dev/shm's size (tmp_mb).
        big = run_python(f"import os\nfor i in range(8):\n    fd = os.open(f'/dev/shm/{name}-{{i}}', os.O_CREAT | os.O_RDWR)\n"
                         f"    os.posix_fallocate(fd, 0, 15 << 20)", LIMITS)
        assert not big.ok and "No space left" in big.error, big.error
    finally:
        if os.path.exists(f"/dev/shm/{name}"):
            os.unlink(f"/dev/shm/{name}")


def test_the_callers_run_dir_and_checkout_are_not_readable():
    run_dir = _world_readable_dir()
    try:
        secret = f"reward-secret-{uuid.uuid4().hex}"
        with open(os.path.join(run_dir, "scored.jsonl"), "w") as f:
            f.write(secret)
        os.chmod(os.path.join(run_dir, "scored.jsonl"), 0o644)
        checkout_file = os.path.abspath(__file__)  # world-readable in a checkout made with umask 022
        code = (f"import os\nfor path in ({run_dir + '/scored.jsonl'!r}, {checkout_file!r}, '/etc/hostname', '/root'):\n"
                f"    try:\n        print('READ', path, open(path).read()[:200] if not os.path.isdir(path) else os.listdir(path))\n"
                f"    except OSError as e:\n        print('refused', path, type(e).__name__)\n"
                f"try:\n    print('LISTED', os.listdir({run_dir!r}))\nexcept OSError as e:\n    print('refused listing')")
        r = run_python(code, LIMITS)
        assert r.ok, r.error
        assert "READ" not in r.stdout and "LISTED" not in r.stdout and secret not in r.stdout, r.stdout
        assert "Sandbox against hostile code" not in r.stdout
    finally:
        shutil.rmtree(run_dir)


def test_a_concurrent_calls_files_are_not_readable():
    marker = f"episode-{uuid.uuid4().hex}"
    writer_code = (f"import os, time\nopen('{marker}.txt', 'w').write('answer-{marker}')\n"
                   f"print(os.getuid(), os.getcwd())\ntime.sleep(1.5)")
    reader_code = ("import glob, os\nprint(os.getuid())\n"
                   f"for path in glob.glob('/tmp/**/{marker}*', recursive=True) + glob.glob('/tmp/*/{marker}*'):\n"
                   "    try:\n        print('READ', open(path).read())\n    except OSError as e:\n        print('refused', e)")
    results = {}
    writer = threading.Thread(target=lambda: results.setdefault("writer", run_python(writer_code, LIMITS)))
    writer.start()
    time.sleep(0.5)  # the writer's file exists by now (a call starts in well under 0.5 s)
    results["reader"] = run_python(reader_code, LIMITS)
    writer.join()
    w, rd = results["writer"], results["reader"]
    assert w.ok and rd.ok, (w.error, rd.error)
    assert f"answer-{marker}" not in rd.stdout and "READ" not in rd.stdout, rd.stdout
    if os.getuid() == 0:  # root mode: each concurrent call runs as a uid of its own
        writer_uid, reader_uid = int(w.stdout.split()[0]), int(rd.stdout.split()[0])
        assert writer_uid != reader_uid and {writer_uid, reader_uid} <= set(range(UID_BASE, UID_BASE + UID_SLOTS))


def test_host_unix_sockets_are_not_reachable():
    where = _world_readable_dir()
    path = os.path.join(where, "service.sock")
    abstract = f"\0rlhf-sandbox-test-{uuid.uuid4().hex}"
    servers = []
    try:
        for address in (path, abstract):
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(address)
            server.listen()
            server.setblocking(False)
            servers.append(server)
        os.chmod(path, 0o777)  # like a service socket open to every local user
        code = (f"import socket\nfor address in ({path!r}, {abstract!r}):\n"
                f"    s = socket.socket(socket.AF_UNIX)\n    try:\n        s.connect(address)\n        print('CONNECTED', repr(address))\n"
                f"    except OSError as e:\n        print('refused', type(e).__name__)")
        r = run_python(code, LIMITS)
        assert r.ok, r.error
        assert "CONNECTED" not in r.stdout and r.stdout.count("refused") == 2, r.stdout
        for server in servers:
            with pytest.raises(BlockingIOError):  # nobody knocked
                server.accept()
    finally:
        for server in servers:
            server.close()
        shutil.rmtree(where)


@pytest.mark.parametrize("code, error", [
    ("open('big', 'wb').write(b'x' * (100 << 20))", "File too large"),  # RLIMIT_FSIZE (file_mb)
    ("for i in range(8):\n    open(f'part{i}', 'wb').write(b'x' * (15 << 20))", "No space left on device"),  # tmp_mb
])
def test_filling_the_disk_is_bounded(code, error):
    r = run_python(code, LIMITS)
    assert not r.ok and error in r.error and r.seconds < LIMITS.wall_s, r.error


def test_kernel_interfaces_the_code_has_no_use_for_are_denied():
    # seccomp: each call answers EPERM (1); what ordinary code does (threads, subprocesses) still works.
    code = ("import ctypes, subprocess, threading\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "calls = {'unshare(user)': lambda: libc.unshare(0x10000000), 'ptrace': lambda: libc.ptrace(0, 0, 0, 0),\n"
            "         'mount': lambda: libc.mount(b'none', b'/tmp', b'tmpfs', 0, None),\n"
            "         'clear pdeathsig': lambda: libc.prctl(1, 0, 0, 0, 0), 'keyctl': lambda: libc.syscall(250, 0, 0),\n"
            "         'bpf': lambda: libc.syscall(321, 0, 0, 0), 'perf_event_open': lambda: libc.syscall(298, 0, 0, 0, 0, 0)}\n"
            "for name, call in calls.items():\n    ctypes.set_errno(0)\n    print(name, call(), ctypes.get_errno())\n"
            "t = threading.Thread(target=print, args=('thread',))\nt.start()\nt.join()\n"
            "print(subprocess.run(['/usr/bin/echo', 'child'], capture_output=True, text=True).stdout.strip())")
    if os.uname().machine != "x86_64":  # the raw numbers above are x86_64's
        code = code.replace("'keyctl': lambda: libc.syscall(250, 0, 0),", "").replace(
            "'bpf': lambda: libc.syscall(321, 0, 0, 0), 'perf_event_open': lambda: libc.syscall(298, 0, 0, 0, 0, 0)", "")
    r = run_python(code, LIMITS)
    assert r.ok, (r.error, r.stderr)
    lines = r.stdout.splitlines()
    assert lines[-2:] == ["thread", "child"], r.stdout
    for line in lines[:-2]:
        assert line.endswith(" -1 1"), f"not denied: {line}"


_UNPRIVILEGED = '''
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("sandbox", sys.argv[1])
sandbox = sys.modules["sandbox"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sandbox)
r = sandbox.run_python(sys.stdin.read())
print(json.dumps([r.stdout, r.error]))
'''


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to start a caller of another uid")
def test_the_unprivileged_mode_holds_too():
    # The caller is an ordinary user: the sandbox runs in a user namespace. The system interpreter
    # (this venv's lives under /root, which that user cannot enter) loads a copy of sandbox.py by path.
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    if system_python is None or subprocess.run([system_python, "-c", "import sys; assert sys.version_info >= (3, 10)"]).returncode:
        pytest.skip("no system python3 >= 3.10 that an unprivileged user can run")
    run_dir = _world_readable_dir()
    try:
        with open(os.path.join(run_dir, "secret"), "w") as f:
            f.write("unprivileged-secret")
        os.chmod(os.path.join(run_dir, "secret"), 0o644)
        code = (f"import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                f"print('caps', open('/proc/self/status').read().split('CapEff:')[1].split()[0])\n"
                f"print('unshare', libc.unshare(0x10000000), ctypes.get_errno())\n"
                f"try:\n    print('READ', open({run_dir + '/secret'!r}).read())\nexcept OSError:\n    print('refused')\n"
                f"print('shm', libc.shmget(0, ctypes.c_size_t(768 << 20), 0o1600))")
        # A copy the other user can read wherever the checkout lives (CI's may not be world-readable):
        # sandbox.py and the confined process's program it reads beside it.
        tools = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "rlhf_cluster", "tools")
        for name in ("sandbox.py", "sandbox_child.py"):
            os.chmod(shutil.copy(os.path.join(tools, name), os.path.join(run_dir, name)), 0o644)
        sandbox_py = os.path.join(run_dir, "sandbox.py")
        out = subprocess.run([system_python, "-I", "-c", _UNPRIVILEGED, sandbox_py], input=code, capture_output=True,
                             text=True, user=54321, group=54321, cwd="/", env={}, timeout=30)
        assert out.returncode == 0, out.stderr
        import json
        stdout, error = json.loads(out.stdout)
        if error and error.startswith("sandbox unavailable: unshare"):
            pytest.skip(f"this kernel refuses unprivileged user namespaces ({error}): the mode is refused, clearly")
        assert error is None, error
        assert stdout.splitlines() == ["caps 0000000000000000", "unshare -1 1", "refused", "shm -1"], stdout
    finally:
        shutil.rmtree(run_dir)
