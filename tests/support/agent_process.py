"""A ``pear-mqtt agent`` child process for integration tests, importable by any of them::

    from agent_process import AgentProcess
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

REPO = Path(__file__).resolve().parents[2]


class AgentProcess:
    """``python -m pear_mqtt.cli.main agent ...`` with its stderr lines readable as they come."""

    # Every agent a test started: a failed assertion skips the test's own ending, and
    # :meth:`kill_leftovers` ends what it left running.
    _started: ClassVar[list[AgentProcess]] = []

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        AgentProcess._started.append(self)
        self.proc = proc
        self.stderr: list[str] = []
        self._lines: asyncio.Queue[str] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, *args: str | Path) -> AgentProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PEAR_")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pear_mqtt.cli", "agent", *map(str, args), cwd=REPO,
            env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            text = line.decode(errors="replace").rstrip("\n")
            self.stderr.append(text)
            self._lines.put_nowait(text)

    def forget(self) -> None:
        """Drop the lines seen so far: :meth:`wait_line` looks only at later ones."""
        while not self._lines.empty():
            self._lines.get_nowait()

    async def wait_line(self, predicate: Callable[[str], bool], timeout: float) -> str:
        async def look() -> str:
            while True:
                line = await self._lines.get()
                if predicate(line):
                    return line
        try:
            return await asyncio.wait_for(look(), timeout)
        except TimeoutError:
            raise AssertionError("agent never printed the expected line; stderr:\n"
                                 + "\n".join(self.stderr)) from None

    async def finish(self, timeout: float) -> tuple[int, dict[str, Any]]:
        """Wait for the exit; return the status and the JSON report from stdout."""
        assert self.proc.stdout is not None
        try:
            out, _ = await asyncio.wait_for(
                asyncio.gather(self.proc.stdout.read(), self.proc.wait()), timeout)
            await asyncio.wait_for(self._reader, timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError("agent did not exit; stderr:\n"
                                 + "\n".join(self.stderr)) from None
        lines = out.decode().strip().splitlines()
        assert lines, "no report on stdout; stderr:\n" + "\n".join(self.stderr)
        return self.proc.returncode or 0, json.loads(lines[-1])

    @classmethod
    def kill_leftovers(cls) -> None:
        """SIGKILL the agents started so far that have not been waited for (their worker
        processes end with them)."""
        for agent in cls._started:
            if agent.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(agent.proc.pid, signal.SIGKILL)
        cls._started.clear()

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    async def kill(self, timeout: float) -> None:
        """SIGKILL, then wait for the exit and the last stderr line."""
        self.proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(self._reader, timeout)
