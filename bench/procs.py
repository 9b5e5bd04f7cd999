"""Spawned worker processes, driven over pipes (see :mod:`bench.workers` for the protocol)."""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

from .workers import entry

__all__ = ["Worker", "WorkerError"]

_CTX = multiprocessing.get_context("spawn")


class WorkerError(RuntimeError):
    """A worker failed (its traceback is the message), died, or did not answer in time."""


class Worker:
    """One benchmark client in its own (spawned) process.

    ``start()`` → ``ready()`` → optionally ``go()`` → ``result()``; ``close()`` kills the
    process if it is still running (only this process, by its handle).
    """

    def __init__(self, name: str, spec: dict[str, Any]) -> None:
        self.name = name
        self._conn, child = _CTX.Pipe()
        self._child: Connection | None = child
        self.proc: multiprocessing.context.SpawnProcess = _CTX.Process(
            target=entry, args=(child, name, spec), name=f"bench-{name}", daemon=True)

    def start(self) -> Worker:
        self.proc.start()
        if self._child is not None:
            self._child.close()  # the parent keeps only its end: EOF when the worker dies
            self._child = None
        return self

    def _recv(self, kind: str, timeout: float) -> Any:
        try:
            if not self._conn.poll(timeout):
                raise WorkerError(f"{self.name}: no {kind!r} within {timeout} s")
            tag, payload = self._conn.recv()
        except EOFError:
            self.proc.join(5)
            raise WorkerError(f"{self.name} exited (code {self.proc.exitcode}) before "
                              f"{kind!r}") from None
        if tag == "error":
            raise WorkerError(f"{self.name} failed:\n{payload}")
        if tag != kind:
            raise WorkerError(f"{self.name}: expected {kind!r}, got {tag!r}")
        return payload

    def recv(self, kind: str, timeout: float) -> dict[str, Any]:
        """Wait for an intermediate report ``(kind, info)`` (e.g. the fan-in's "connected")."""
        info: dict[str, Any] = self._recv(kind, timeout)
        return info

    def ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the worker is connected (and subscribed)."""
        info: dict[str, Any] = self._recv("ready", timeout)
        return info

    def go(self) -> None:
        """Tell a sender to start its timed work."""
        self._conn.send("go")

    def open_gate(self) -> None:
        """Let a worker started with ``spec["gate"]`` connect."""
        self._conn.send("connect")

    def result(self, timeout: float = 900.0) -> dict[str, Any]:
        """Wait for the worker's measurement and for the process to end."""
        out: dict[str, Any] = self._recv("done", timeout)
        self.proc.join(30)
        return out

    def close(self) -> None:
        if self.proc.pid is not None and self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self._conn.close()

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
