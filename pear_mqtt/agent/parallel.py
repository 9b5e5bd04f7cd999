"""An input file prepared by worker processes (:class:`~.workers.WorkerPool`): the agent reads
its lines and hands them out in chunks, and stores the prepared batches in file order as they
come back. When it pays: docs/DESIGN.md (Edge agent)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from ..model.insight import MarketInsight
from .prepare import PreparedChunk
from .records import RecordFile, RejectCallback
from .sources import FileSource, good_chunks
from .workers import WorkerLost, WorkerPool

__all__ = ["MIN_PARALLEL_BYTES", "ParallelFileSource", "prepared_chunks"]

MIN_PARALLEL_BYTES = 1 << 20
"""Files smaller than this are prepared in the agent's process: starting workers would cost
more than they save."""


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
        async for chunk in prepared_chunks(RecordFile(self.path, fmt=self.format),
                                           pool=self._pool, stop=stop, reject=reject,
                                           size=max_items):
            yield chunk


async def prepared_chunks(records: RecordFile, *, pool: WorkerPool, stop: asyncio.Event,
                          reject: RejectCallback, size: int
                          ) -> AsyncIterator[PreparedChunk]:
    """The data lines of ``records`` handed to ``pool`` ``size`` at a time, two chunks per
    worker ahead of the one yielded; each chunk's outcome in file order, its bad lines
    reported through ``reject``. Prepared in this process when the pool has no worker (left).
    Ends early when ``stop`` is set; raises :class:`OSError` if the file cannot be read."""
    depth = 2 * pool.size + 1
    pending: deque[tuple[asyncio.Future[PreparedChunk] | None, dict[str, Any],
                         list[tuple[int, str]]]] = deque()

    def submit(lines: list[tuple[int, str]]) -> None:
        assert records.parser is not None
        spec = records.parser.spec
        pending.append((pool.submit(spec, lines), spec, lines))

    async def take() -> PreparedChunk:
        fut, spec, lines = pending.popleft()
        chunk: PreparedChunk | None = None
        if fut is not None:
            with contextlib.suppress(WorkerLost):
                chunk = await fut  # the pool said why it failed
        if chunk is None:
            chunk = pool.local(spec, lines)
        for rejection in chunk.rejections:
            reject(rejection)
        return chunk

    try:
        for lines in good_chunks(records.lines(), stop=stop, reject=reject, size=size):
            submit(lines)
            if len(pending) > depth:
                yield await take()
        while pending and not stop.is_set():
            yield await take()
    finally:
        for fut, _, _ in pending:
            if fut is not None:
                fut.cancel()
