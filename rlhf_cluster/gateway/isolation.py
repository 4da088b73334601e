"""Agent code in processes of its own (`generation.agent.isolation: process`).

Each of the worker's `agent.max_concurrent` slots is a child Python process (started on first
use) that imports the agent once and then runs one episode at a time: the parent writes the call
(`base_url`, `api_key`, `messages`) as a JSON line on the child's stdin and reads the result from
a pipe of its own (the agent's prints go to stderr). An episode's failure is the child's, never
the worker's:

- past `agent.timeout_s` the child is killed (a thread cannot be; a killed process frees its
  slot at once);
- the child's address space is capped at `agent.memory_mb` beyond what it holds once the agent is
  imported (an agent that allocates without bound gets a MemoryError, or dies);
- an agent that exits (`os._exit`, a signal, a segfault) ends only its child.

A slot whose child was killed or died gets a new child for its next episode. `AgentFailed` names
what happened (`timeout`, `raised`, `died`, `bad_result`).

    python -m rlhf_cluster.gateway.isolation MODULE:FUNCTION MEMORY_MB     # the child (not by hand)
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
from typing import Any

from rlhf_cluster.user_code import import_spec

READY = "ready"
# A result line is small; an agent's own output goes to stderr, never into the protocol.
LINE_LIMIT = 1 << 20


class AgentFailed(RuntimeError):
    """One episode's agent call failed in its process: `kind` is timeout, raised, died or bad_result."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class _Child:
    """One slot's process and its protocol pipe."""

    def __init__(self, process: asyncio.subprocess.Process, results: asyncio.StreamReader):
        self.process, self.results = process, results

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()


class AgentProcesses:
    """The worker's agent slots (see the module's doc). `call` runs one episode in a free slot."""

    def __init__(self, spec: str, slots: int, memory_mb: int, start_timeout_s: float = 120.0):
        self.spec, self.memory_mb, self.start_timeout_s = spec, memory_mb, start_timeout_s
        self._idle: list[_Child] = []
        self._free = asyncio.Semaphore(slots)
        self.started = 0  # children started, replacements included

    async def call(self, base_url: str, api_key: str, messages: list[dict], timeout_s: float) -> Any:
        async with self._free:
            child = self._idle.pop() if self._idle else await self._start()
            try:
                result = await self._run(child, base_url, api_key, messages, timeout_s)
            except BaseException:
                await child.kill()  # whatever state it is in, it serves no other episode
                raise
            self._idle.append(child)
            return result

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for child in idle:
            if child.process.stdin is not None:
                child.process.stdin.close()
            await child.kill()

    async def _start(self) -> _Child:
        read, write = os.pipe()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # what the worker imports from
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            __name__,
            self.spec,
            str(self.memory_mb),
            str(write),
            stdin=asyncio.subprocess.PIPE,
            pass_fds=(write,),
            env=env,
        )
        os.close(write)
        loop = asyncio.get_running_loop()
        results = asyncio.StreamReader(limit=LINE_LIMIT)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(results), os.fdopen(read, "rb"))
        child = _Child(process, results)
        self.started += 1
        try:
            async with asyncio.timeout(self.start_timeout_s):
                line = await results.readline()
        except TimeoutError:
            await child.kill()
            raise AgentFailed("died", f"the agent process did not start within {self.start_timeout_s:g} s") from None
        reply = _parse(line)
        if reply.get("status") != READY:
            await child.kill()
            raise AgentFailed("died", f"the agent process could not load {self.spec}: {reply.get('error', line)!r}")
        return child

    async def _run(self, child: _Child, base_url: str, api_key: str, messages: list[dict], timeout_s: float) -> Any:
        assert child.process.stdin is not None  # started with a pipe
        child.process.stdin.write(json.dumps([base_url, api_key, messages]).encode() + b"\n")
        try:
            await child.process.stdin.drain()
            async with asyncio.timeout(timeout_s):
                line = await child.results.readline()
        except TimeoutError:
            raise AgentFailed("timeout", f"did not return within generation.agent.timeout_s={timeout_s:g} s") from None
        except (BrokenPipeError, ConnectionResetError):
            line = b""
        if not line:  # the child is gone
            code = await child.process.wait()
            how = f"signal {-code}" if code < 0 else f"exit status {code}"
            raise AgentFailed("died", f"the agent's process ended ({how}) during the episode")
        reply = _parse(line)
        if "raised" in reply:
            raise AgentFailed("raised", f"raised {reply['raised']}")
        if "result" not in reply:
            raise AgentFailed("bad_result", f"the agent process answered {line[:200]!r}")
        return reply["result"]


def _parse(line: bytes) -> dict:
    try:
        reply = json.loads(line)
    except ValueError:
        return {}
    return reply if isinstance(reply, dict) else {}


def _child(spec: str, memory_mb: int, results_fd: int) -> None:
    """The child's loop: import the agent, cap memory, then one call per stdin line (until the
    worker closes stdin, or dies: the child is killed with it)."""
    _die_with_parent()
    results = os.fdopen(results_fd, "w", buffering=1)
    try:
        agent = import_spec(spec, "generation.agent.function", example="my_agent:run")
        if not callable(agent):
            raise ValueError(f"generation.agent.function={spec!r} is not a function")
    except BaseException as exc:
        results.write(json.dumps({"status": "failed", "error": f"{type(exc).__name__}: {exc}"}) + "\n")
        return
    with open("/proc/self/statm") as fh:  # pages of address space held now (the interpreter, the agent's imports)
        held = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (held + memory_mb * (1 << 20), resource.RLIM_INFINITY))
    results.write(json.dumps({"status": READY}) + "\n")
    for line in sys.stdin:
        base_url, api_key, messages = json.loads(line)
        try:
            result = agent(base_url, api_key, messages)
            reply = json.dumps({"result": result})
        except BaseException as exc:  # the episode's failure, reported; the process serves the next one
            reply = json.dumps({"raised": f"{type(exc).__name__}: {exc}"[:2000]})
        results.write(reply + "\n")


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the worker that started it dies (an agent sleeping in an
    episode would otherwise outlive it)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the child still ends when its stdin closes


if __name__ == "__main__":
    os.dup2(2, 1)  # the agent's prints go to stderr: the results have a pipe of their own
    _child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
