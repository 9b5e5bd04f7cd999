"""The agent's worker processes, forked before its event loop starts: each prepares the
chunks of lines it is sent (:func:`~.prepare.prepare_lines`) and sends them back over its own
socket pair, which the agent's event loop reads. Why processes, and why not the standard
library's pool: docs/DESIGN.md (Edge agent)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections import deque
from typing import TYPE_CHECKING, Any

from ..config.models import NetworkConfig
from ..errors import PearError
from ..node.producer import Preparer
from .prepare import PreparedChunk, prepare_lines
from .records import RecordParser

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

__all__ = ["WorkerLost", "WorkerPool", "default_workers"]

log = logging.getLogger(__name__)

_MAX_DEFAULT_WORKERS = 4
_START_TIMEOUT = 30.0  # s for the workers to load the node's key and certificate
_STOP_TIMEOUT = 2.0  # s a worker has to end after being told to
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def default_workers() -> int:
    """One fewer than the CPUs this process may run on (the agent's own loop needs one), at
    most 4: preparing costs about as much as storing and sending, so more rarely pay."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(0, min(_MAX_DEFAULT_WORKERS, cpus - 1))


# -- inside a worker process ------------------------------------------------------------------

def _worker_main(conn: Connection, config: NetworkConfig, parent: int) -> None:
    """A worker's life: load the node's identity, say so, then prepare each chunk it is sent
    until it gets None or the agent is gone."""
    # The agent decides when to stop and then ends its workers: a terminal's Ctrl-C, sent to
    # the whole process group, must not end one mid-chunk.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":
        # Killed outright, the agent could not end its workers: the kernel does, with it.
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            return  # the agent is gone already
    try:
        preparer = Preparer.from_config(config)
    except (PearError, OSError) as exc:
        conn.send(("error", str(exc)))
        return
    conn.send(("ready", os.getpid()))
    parsers: dict[tuple[Any, ...], RecordParser] = {}
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return  # the agent closed its end
        if job is None:
            return
        spec, lines = job
        key = tuple(spec.values())
        parser = parsers.get(key)
        if parser is None:
            parser = parsers[key] = RecordParser(**spec)
        chunk = prepare_lines(preparer, parser, lines)
        try:
            conn.send(chunk)
        except OSError:
            return  # the agent closed its end: it wants no more


# -- in the agent -----------------------------------------------------------------------------

class WorkerLost(Exception):
    """A worker process ended with chunks it had been given (see :class:`WorkerPool`)."""


class _Worker:
    __slots__ = ("conn", "process", "reading", "waiting")

    def __init__(self, process: BaseProcess, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.reading = False
        self.waiting: deque[asyncio.Future[PreparedChunk]] = deque()


class WorkerPool:
    """``workers`` processes preparing insights as the node of ``config`` would.

    :meth:`start` forks them, and must run before the event loop and its threads exist (a
    forked process inherits the loaded modules, so it starts in milliseconds, but only the
    thread that forked it). Each worker has a socket pair to the agent, whose event loop
    reads the results: no helper thread, and a worker that dies, even halfway through a
    result, shows as the end of its socket (the standard library's process pool hangs
    then; docs/DESIGN.md, Edge agent). A pool that cannot start, or whose worker dies, is
    reported once and its work done in the agent's process instead: nothing is lost.
    """

    def __init__(self, *, config: NetworkConfig, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self._config = config
        self._wanted = workers
        self._workers: list[_Worker] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._local: Preparer | None = None

    @property
    def running(self) -> bool:
        return bool(self._workers)

    @property
    def size(self) -> int:
        """Worker processes running (0 once the pool has closed or failed)."""
        return len(self._workers)

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(w.process.pid or 0 for w in self._workers)

    def start(self) -> None:
        """Fork the workers and wait until each has loaded the node's identity."""
        # Imported here: an agent without workers does without multiprocessing (~0.6 MB).
        import multiprocessing

        try:
            ctx = multiprocessing.get_context("fork")
        except ValueError:
            self._fail("worker processes need the fork start method")
            return
        for _ in range(self._wanted):
            mine, theirs = ctx.Pipe(duplex=True)  # a socket pair: ~200 KiB buffered
            process = ctx.Process(target=_worker_main, name="pear-prepare", daemon=True,
                                  args=(theirs, self._config, os.getpid()))
            try:
                process.start()
            except OSError as exc:
                mine.close()
                theirs.close()
                self._fail(f"could not start a worker process ({exc})")
                return
            theirs.close()  # the worker holds the only other end: its exit ends the socket
            self._workers.append(_Worker(process, mine))
        for worker in self._workers:
            why = self._started(worker)
            if why is not None:
                self._fail(f"could not start {self._wanted} worker process(es) ({why})")
                return

    @staticmethod
    def _started(worker: _Worker) -> str | None:
        """None once ``worker`` said it is ready, else why it is not."""
        try:
            if not worker.conn.poll(_START_TIMEOUT):
                return f"no answer within {_START_TIMEOUT:g} s"
            kind, detail = worker.conn.recv()
        except (EOFError, OSError):
            worker.process.join(1.0)
            return f"it ended with exit code {worker.process.exitcode}"
        return None if kind == "ready" else str(detail)

    def submit(self, spec: dict[str, Any], lines: list[tuple[int, str]]
               ) -> asyncio.Future[PreparedChunk] | None:
        """Hand a chunk to the least busy worker; its future, or None when there are no
        workers (prepare it with :meth:`local`). Called from the event loop."""
        if not self._workers:
            return None
        loop = self._loop = asyncio.get_running_loop()
        worker = min(self._workers, key=lambda w: len(w.waiting))
        if not worker.reading:
            loop.add_reader(worker.conn.fileno(), self._readable, worker)
            worker.reading = True
        try:
            worker.conn.send((spec, lines))
        except OSError as exc:
            self._lost(worker, exc)
            return None
        fut: asyncio.Future[PreparedChunk] = loop.create_future()
        worker.waiting.append(fut)
        return fut

    def _readable(self, worker: _Worker) -> None:
        try:
            chunk = worker.conn.recv()
        except (EOFError, OSError) as exc:
            self._lost(worker, exc)
            return
        if worker.waiting:
            fut = worker.waiting.popleft()
            if not fut.done():
                fut.set_result(chunk)

    def _lost(self, worker: _Worker, exc: BaseException) -> None:
        worker.process.join(0.5)
        code = worker.process.exitcode
        how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
               and -code in signal.valid_signals() else f"exit code {code}")
        why = f"worker process {worker.process.pid} ended ({how}; {exc or type(exc).__name__})"
        for other in self._workers:
            for fut in other.waiting:
                if not fut.done():
                    fut.set_exception(WorkerLost(why))
        self._fail(why)

    def local(self, spec: dict[str, Any], lines: list[tuple[int, str]]) -> PreparedChunk:
        """The chunk prepared in this process."""
        if self._local is None:
            self._local = Preparer.from_config(self._config)
        return prepare_lines(self._local, RecordParser(**spec), lines)

    def _fail(self, why: str) -> None:
        log.warning("%s: preparing the input in the agent's process instead", why)
        self.close()

    def close(self) -> None:
        """End the workers (idempotent); chunks not yet prepared are dropped."""
        workers, self._workers = self._workers, []
        loop = self._loop
        for worker in workers:
            if worker.reading and loop is not None and not loop.is_closed():
                loop.remove_reader(worker.conn.fileno())
            with contextlib.suppress(OSError):
                worker.conn.send(None)
            # Closed at once: a worker still sending a result sees the end, not a full buffer.
            worker.conn.close()
            for fut in worker.waiting:
                fut.cancel()
        for worker in workers:
            worker.process.join(_STOP_TIMEOUT)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
