"""The market store's writer process: a node's feed hands it the rows of each batch and it
writes them through a connection of its own, at a lower CPU priority. The store's SQLite
work then neither holds the receiving process's interpreter nor takes a core from the live
stream while the machine is busy; it catches up when the machine is idle. Rationale and
limits: docs/MARKET.md, "Writer process"."""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import signal
import time
import weakref
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ..errors import MarketError
from ..node.records import ReceivedAggregate
from .writer import Retention, Row

__all__ = ["NICE", "WriterProcess"]

log = logging.getLogger(__name__)

NICE = 10
"""How much lower the writer's CPU priority is than the node's (``nice`` steps)."""
_START = 30.0  # s for a new writer process to open the store
_ALIVE = 1.0  # s between checks that the writer still runs while it writes a batch
# Children fork from one server process that imported these already: a node's writer
# starts in milliseconds, not the interpreter's start-up.
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["pear_mqtt.market.store"])
_RUNNING: weakref.WeakSet[WriterProcess] = weakref.WeakSet()


@atexit.register
def _let_go() -> None:
    # A node's process that exits without closing its node: multiprocessing's own exit
    # handler (registered earlier, so run after this one) joins every child, and a writer
    # ends only at the end of its pipe.
    for writer in list(_RUNNING):
        if writer._conn is not None:
            writer._conn.close()


class WriterProcess:
    """One writer process for the store at ``path``; :meth:`write` is called from one
    thread at a time. A writer that dies is started again and the batch sent again."""

    def __init__(self, *, path: Path, network: str, mode: str, retention: Retention) -> None:
        self._args = (str(path), network, mode, retention)
        self._proc: Any = None
        self._conn: Connection | None = None

    @property
    def pid(self) -> int | None:
        """The writer's process id while it runs."""
        return None if self._proc is None else int(self._proc.pid)

    def write(self, rows: list[Row], aggregates: Sequence[ReceivedAggregate]) -> int:
        """Store one batch (in one transaction there); returns how many rows were new.
        :class:`MarketError` when the store refuses it (its message says why)."""
        for attempt in (1, 2):
            conn = self._conn or self._start()
            try:
                conn.send((rows, list(aggregates)))
                return self._reply(conn)
            except (EOFError, OSError) as exc:
                self._stop(kill=True)
                if attempt == 2:
                    raise MarketError(f"market store {self._args[0]}: its writer process "
                                      f"ended twice ({exc or 'no reply'}); the node keeps "
                                      "the items and retries") from None
                log.warning("market store %s: its writer process ended; starting another",
                            self._args[0])
        raise AssertionError("unreachable")

    def close(self, timeout: float = 10.0) -> None:
        """Let the writer finish and end (killed after ``timeout`` s)."""
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send(None)
        self._stop(kill=False, timeout=timeout)

    def _start(self) -> Connection:
        try:
            mine, theirs = _CONTEXT.Pipe()
            proc = _CONTEXT.Process(target=_serve, args=(theirs, *self._args),
                                    name="pear-market-writer", daemon=True)
            proc.start()
        except Exception as exc:  # e.g. AssertionError: a daemonic process has no children
            raise MarketError(f"market store {self._args[0]}: cannot start its writer "
                              f"process ({exc or type(exc).__name__})") from exc
        theirs.close()  # only the child holds its end: its exit is our EOF
        self._proc, self._conn = proc, mine
        _RUNNING.add(self)
        try:
            self._reply(mine, deadline=time.monotonic() + _START)
        except (EOFError, OSError, MarketError):
            self._stop(kill=True)
            raise
        return mine

    def _reply(self, conn: Connection, *, deadline: float | None = None) -> int:
        while not conn.poll(_ALIVE):
            if not self._proc.is_alive():
                raise EOFError(f"exit code {self._proc.exitcode}")
            if deadline is not None and time.monotonic() > deadline:
                raise MarketError(f"market store {self._args[0]}: its writer process did "
                                  f"not start within {_START:.0f} s")
        kind, value = conn.recv()
        if kind == "error":
            raise MarketError(str(value))
        return int(value)

    def _stop(self, *, kill: bool, timeout: float = 10.0) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if proc is not None:
            if kill:
                proc.kill()
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout)
        if conn is not None:
            conn.close()


def _serve(conn: Connection, path: str, network: str, mode: str,
           retention: Retention) -> None:
    """The writer process: batches in, ``("ok", added)`` or ``("error", why)`` out, until
    ``None`` or the node's end of the pipe closes."""
    from .store import MarketStore
    # Ctrl-C and a service stop reach the whole process group: the node ends this process
    # once its last batch is written, or its exit closes the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(NICE)
    try:
        store = MarketStore.open(path, network=network, mode=mode, retention=retention)
    except MarketError as exc:
        conn.send(("error", str(exc)))
        return
    try:
        conn.send(("ready", 0))
        while True:
            try:
                batch = conn.recv()
            except EOFError:
                break
            if batch is None:
                break
            rows, aggregates = batch
            try:
                conn.send(("ok", store.add_rows(rows, aggregates)))
            except MarketError as exc:
                conn.send(("error", str(exc)))
    finally:
        store.close()
