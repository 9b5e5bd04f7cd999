"""An input file prepared by worker processes: they parse, validate, filter and seal its lines
(:class:`~pear_mqtt.node.producer.Preparer`), while the agent's event loop stores the prepared
batches in file order and sends them. Why processes, and when: docs/DESIGN.md (Edge agent)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import BrokenExecutor, Future
from typing import TYPE_CHECKING, Any, NamedTuple

from ..config.models import NetworkConfig
from ..errors import PrivacyError, TopicError
from ..model.insight import MarketInsight
from ..node.producer import Prepared, PreparedBatch, Preparer
from .records import RecordFile, RecordParser, RejectCallback, Rejection
from .sources import FileSource

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

__all__ = ["MIN_PARALLEL_BYTES", "ParallelFileSource", "PreparedChunk", "WorkerPool",
           "default_workers", "prepare_lines"]

log = logging.getLogger(__name__)

MIN_PARALLEL_BYTES = 1 << 20
"""Files smaller than this are prepared in the agent's process: starting workers would cost
more than they save."""

_MAX_DEFAULT_WORKERS = 4
_START_TIMEOUT = 30.0  # s for the workers to load the node's key and certificate
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_TRIM_EVERY = 16  # chunks between returns of freed heap memory to the system


def default_workers() -> int:
    """One fewer than the CPUs this process may run on (the agent's own loop needs one), at
    most 4: preparing costs about as much as storing and sending, so more rarely pay."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(0, min(_MAX_DEFAULT_WORKERS, cpus - 1))


class PreparedChunk(NamedTuple):
    """The outcome of one chunk of lines: how many were insights (``read``), the lines that
    were not, the prepared batch, and the insights the privacy filter refused (one text each,
    naming the insight and the rule)."""

    read: int
    rejections: list[Rejection]
    batch: PreparedBatch
    refused: list[str]


def prepare_lines(preparer: Preparer, parser: RecordParser,
                  lines: list[tuple[int, str]]) -> PreparedChunk:
    """Parse ``lines`` and prepare their insights in one batch; when the filter refuses one,
    the others are prepared one by one (the refused are reported, not raised)."""
    insights: list[MarketInsight] = []
    rejections: list[Rejection] = []
    for lineno, text in lines:
        record = parser.parse(lineno, text)
        if isinstance(record, Rejection):
            rejections.append(record)
        else:
            insights.append(record)
    try:
        batch = preparer.prepare_many(insights)
    except (PrivacyError, TopicError):
        batch, refused = _one_by_one(preparer, insights)
        return PreparedChunk(len(insights), rejections, batch, refused)
    return PreparedChunk(len(insights), rejections, batch, [])


def _one_by_one(preparer: Preparer, insights: list[MarketInsight]
                ) -> tuple[PreparedBatch, list[str]]:
    ids: list[str] = []
    items: list[Prepared] = []
    refused: list[str] = []
    unsealed = 0
    for insight in insights:
        try:
            item_id, item, dropped = preparer.prepare(insight)
        except (PrivacyError, TopicError) as exc:
            refused.append(f"{insight.category} {insight.window_start.isoformat()}: {exc}")
            continue
        ids.append(item_id)
        unsealed += dropped
        if item is not None:
            items.append(item)
    return PreparedBatch(preparer.origin, ids, items, unsealed), refused


# -- inside a worker process ------------------------------------------------------------------

_worker_preparer: Preparer | None = None
_worker_parsers: dict[tuple[Any, ...], RecordParser] = {}


def _start_worker(config: NetworkConfig, parent: int) -> None:
    global _worker_preparer
    # The agent decides when to stop and then ends its workers: a terminal's Ctrl-C (sent to
    # the whole process group) or a service manager's SIGTERM must not kill one mid-chunk.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform == "linux":
        # A worker blocks reading its next chunk from a pipe it holds both ends of, so it
        # would outlive an agent killed outright: the kernel ends it with its parent.
        import ctypes  # here: only a worker needs it

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)  # the agent is gone already
    _worker_preparer = Preparer.from_config(config)


def _ready() -> int:
    return os.getpid()


def _work(spec: dict[str, Any], lines: list[tuple[int, str]]) -> PreparedChunk:
    assert _worker_preparer is not None
    key = tuple(spec.values())
    parser = _worker_parsers.get(key)
    if parser is None:
        parser = _worker_parsers[key] = RecordParser(**spec)
    return prepare_lines(_worker_preparer, parser, lines)


# -- in the agent -----------------------------------------------------------------------------

def _heap_trimmer() -> Callable[[], object] | None:
    """glibc's ``malloc_trim``, when there is one.

    A chunk's prepared batch arrives as one ~130 KiB buffer, read by the pool's thread; glibc
    carves such buffers from heaps that fragment, and keeps the freed pages: the agent's
    memory grew by ~150 bytes an insight (36 to 50 MB over 90,000 lines). Trimming after
    every 16 chunks returns them (~0.3 ms a call) and keeps the agent within ~3 MB of its
    size without workers. Mapping such buffers on their own instead (``M_MMAP_THRESHOLD``)
    did as much for memory but cost the agent ~3 us of CPU an insight."""
    if sys.platform != "linux":
        return None
    import ctypes

    try:
        trim: Callable[[int], object] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    return lambda: trim(0)


class WorkerPool:
    """``workers`` processes preparing insights as the node of ``config`` would.

    :meth:`start` forks them, and must run before the event loop and its threads exist (a
    forked process inherits the loaded modules, so it starts in milliseconds, but only the
    thread that forked it). A pool that cannot start, or whose process dies, is reported once
    and its work done in the agent's process instead: nothing is lost either way.
    """

    def __init__(self, *, config: NetworkConfig, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self._config = config
        self._workers = workers
        self._executor: ProcessPoolExecutor | None = None
        self._local: Preparer | None = None
        self.pids: tuple[int, ...] = ()

    @property
    def running(self) -> bool:
        return self._executor is not None

    @property
    def size(self) -> int:
        """Worker processes running (0 once the pool has closed or failed)."""
        return self._workers if self._executor is not None else 0

    def start(self) -> None:
        """Fork the workers and wait until each has loaded the node's identity."""
        # Imported here: an agent without workers does without multiprocessing (~0.6 MB).
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("fork")
        executor = ProcessPoolExecutor(self._workers, mp_context=ctx,
                                       initializer=_start_worker,
                                       initargs=(self._config, os.getpid()))
        try:
            # With fork, every worker starts at the first submission.
            pids = {executor.submit(_ready).result(timeout=_START_TIMEOUT)
                    for _ in range(self._workers)}
        except (BrokenExecutor, TimeoutError, OSError) as exc:
            executor.shutdown(wait=False, cancel_futures=True)
            self._fail(f"could not start {self._workers} worker process(es) "
                       f"({exc or type(exc).__name__})")
            return
        self._executor = executor
        self.pids = tuple(sorted(pids))

    def submit(self, spec: dict[str, Any], lines: list[tuple[int, str]]
               ) -> Future[PreparedChunk] | None:
        """The chunk handed to a worker; None when there are none (prepare it with
        :meth:`local`)."""
        if self._executor is None:
            return None
        try:
            return self._executor.submit(_work, spec, lines)
        except (BrokenExecutor, RuntimeError) as exc:
            self._fail(f"a worker process ended ({exc})")
            return None

    def local(self, spec: dict[str, Any], lines: list[tuple[int, str]]) -> PreparedChunk:
        """The chunk prepared in this process."""
        if self._local is None:
            self._local = Preparer.from_config(self._config)
        return prepare_lines(self._local, RecordParser(**spec), lines)

    def failed(self, exc: BaseException) -> None:
        """A submitted chunk failed in its worker: prepare the rest here."""
        self._fail(f"a worker process ended ({exc or type(exc).__name__})")

    def _fail(self, why: str) -> None:
        log.warning("%s: preparing the input in the agent's process instead", why)
        self.close()

    def close(self) -> None:
        """End the workers (idempotent); chunks not yet prepared are dropped."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ParallelFileSource:
    """A :class:`FileSource` whose lines a :class:`WorkerPool` prepares: yields
    :class:`PreparedChunk` in file order, ``depth`` chunks ahead of the one being stored.

    Like :class:`FileSource`, a stopped run leaves the rest unread (and the chunks already
    handed out unstored): a later run reads the file from the start again.
    """

    def __init__(self, source: FileSource, *, pool: WorkerPool) -> None:
        self.path = source.path
        self.format = source.format
        self._source = source
        self._pool = pool

    def check(self) -> None:
        self._source.check()

    def records(self) -> int:
        return self._source.records()

    async def batches(self, *, stop: asyncio.Event, reject: RejectCallback,
                      max_items: int) -> AsyncIterator[list[MarketInsight] | PreparedChunk]:
        """Hand the file's data lines to the workers ``max_items`` at a time; yield each
        chunk's outcome in order, its bad lines reported through ``reject``."""
        depth = 2 * self._pool.size + 1
        trim = _heap_trimmer()
        taken = 0
        records = RecordFile(self.path, fmt=self.format)
        pending: deque[tuple[asyncio.Future[PreparedChunk] | None, dict[str, Any],
                             list[tuple[int, str]]]] = deque()
        loop = asyncio.get_running_loop()

        def submit(lines: list[tuple[int, str]]) -> None:
            assert records.parser is not None
            spec = records.parser.spec
            fut = self._pool.submit(spec, lines)
            pending.append((None if fut is None else asyncio.wrap_future(fut, loop=loop),
                            spec, lines))

        async def take() -> PreparedChunk:
            fut, spec, lines = pending.popleft()
            chunk: PreparedChunk | None = None
            if fut is not None:
                try:
                    chunk = await fut
                except (BrokenExecutor, OSError) as exc:
                    if self._pool.running:
                        self._pool.failed(exc)
            if chunk is None:
                chunk = self._pool.local(spec, lines)
            nonlocal taken
            taken += 1
            if trim is not None and taken % _TRIM_EVERY == 0:
                trim()
            for rejection in chunk.rejections:
                reject(rejection)
            return chunk

        chunk_lines: list[tuple[int, str]] = []
        try:
            for item in records.lines():
                if stop.is_set():
                    return
                if isinstance(item, Rejection):
                    reject(item)
                    continue
                chunk_lines.append(item)
                if len(chunk_lines) >= max_items:
                    submit(chunk_lines)
                    chunk_lines = []
                    if len(pending) > depth:
                        yield await take()
            if chunk_lines:
                submit(chunk_lines)
            while pending and not stop.is_set():
                yield await take()
        finally:
            for fut, _, _ in pending:
                if fut is not None:
                    fut.cancel()
