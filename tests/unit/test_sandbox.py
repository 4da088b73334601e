"""The Python tool's sandbox against hostile code: each snippet is contained within its limit and
comes back as a tool error, and the caller (here the test process, in a job the generation
worker) carries on. Real processes, real limits: nothing is mocked."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import uuid

import pytest

from rlhf_cluster.tools.calls import ToolCall, run_tool
from rlhf_cluster.tools.sandbox import SandboxLimits, run_python

LIMITS = SandboxLimits(wall_s=4.0, cpu_s=1, memory_mb=256, processes=8, output_bytes=4096)


def _nobody_processes() -> int:
    out = subprocess.run(["ps", "-u", "65534", "-o", "pid="], capture_output=True, text=True)
    return len(out.stdout.split())


def test_benign_code_runs_and_an_exception_is_a_tool_error():
    ok = run_python("print(sum(range(10)))", LIMITS)
    assert ok.ok and ok.stdout == "45\n"
    bad = run_python("raise ValueError('no such column')", LIMITS)
    assert not bad.ok and bad.error == "ValueError: no such column"


def test_infinite_loop_is_stopped_by_the_cpu_limit():
    r = run_python("while True:\n    pass", LIMITS)
    assert not r.ok and "cpu limit" in r.error and r.seconds < LIMITS.wall_s + 1


def test_fork_bomb_hits_the_process_cap_and_dies_with_the_sandbox():
    before = _nobody_processes() if os.getuid() == 0 else 0
    r = run_python("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", LIMITS)
    assert not r.ok and r.seconds < LIMITS.wall_s + 2
    if os.getuid() == 0:  # as root the sandbox runs as nobody: its PID namespace is torn down with it
        deadline = time.monotonic() + 5
        while _nobody_processes() > before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _nobody_processes() <= before, "processes of the fork bomb outlived the sandbox"


def test_ten_gigabytes_is_refused_by_the_memory_limit():
    r = run_python("x = bytearray(10 * 1024 ** 3)\nprint(len(x))", LIMITS)
    assert not r.ok and "out of memory" in r.error and r.stdout == ""


def test_no_network_not_even_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(5)
    accepted = []
    waiter = threading.Thread(target=lambda: accepted.append(_accept(server)), daemon=True)
    waiter.start()
    port = server.getsockname()[1]
    r = run_python(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')", LIMITS)
    waiter.join(timeout=6)
    server.close()
    assert not r.ok and "connected" not in r.stdout and "unreachable" in r.error.lower(), r.error
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
    outside = f"/tmp/rlhf-sandbox-escape-{uuid.uuid4().hex}"
    mine = tmp_path / "owned-by-the-caller.txt"
    mine.write_text("keep")
    code = (f"open('inside.txt', 'w').write('fine')\nprint(open('inside.txt').read())\n"
            f"for path in ({outside!r}, {str(mine)!r}):\n"
            f"    try:\n        open(path, 'w').write('x')\n        print('WROTE', path)\n"
            f"    except OSError as e:\n        print('refused', type(e).__name__)")
    r = run_python(code, LIMITS)
    assert r.ok, r.error
    assert r.stdout.startswith("fine") and "WROTE" not in r.stdout and r.stdout.count("refused") == 2
    assert not os.path.exists(outside) and mine.read_text() == "keep"


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
