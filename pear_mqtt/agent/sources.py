"""Where an agent's insights come from: the :class:`InsightSource` protocol, one file read once
(:class:`FileSource`), a drop directory (:class:`WatchSource`), and nothing (:class:`NoSource`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from ..errors import ConfigError
from ..files import atomic_write
from ..model.insight import MarketInsight
from .records import (
    INPUT_SUFFIXES,
    InputFormat,
    RecordFile,
    RejectCallback,
    Rejection,
    csv_header_line,
    input_format,
    read_insights,
)

if TYPE_CHECKING:
    from .prepare import PreparedChunk

__all__ = ["ChunkPreparer", "FileSource", "InsightSource", "NoSource", "WatchSource",
           "WatchedFile", "good_chunks"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class InsightSource(Protocol):
    """Where an agent's insights come from.

    ``batches`` yields valid insights in lists of at most ``max_items`` (as many as are at
    hand) and reports each bad record through ``reject``. The consumer stores each batch
    before it asks for the next, so a source may record its progress then (as
    :class:`WatchSource` files a file away). It must end soon after ``stop`` is set (a source
    may finish a unit of work first, as :class:`WatchSource` finishes the file at hand) and may
    end on its own (a file is read).
    """

    def batches(self, *, stop: asyncio.Event, reject: RejectCallback,
                max_items: int) -> AsyncIterator[list[MarketInsight] | PreparedChunk]:
        """Yield batches of insights (or of insights already prepared by worker processes)
        until the source is exhausted or ``stop`` is set."""
        ...


class ChunkPreparer(Protocol):
    """Prepares an input file's lines in worker processes, chunk by chunk (the agent's
    :func:`~.parallel.prepared_chunks` bound to its pool)."""

    def __call__(self, records: RecordFile, *, stop: asyncio.Event, reject: RejectCallback,
                 size: int) -> AsyncIterator[PreparedChunk]:
        ...


class NoSource:
    """Reads nothing: the agent only delivers what its outbox holds (``--drain-only``)."""

    async def batches(self, *, stop: asyncio.Event, reject: RejectCallback,
                      max_items: int) -> AsyncIterator[list[MarketInsight]]:
        """End at once."""
        return
        yield  # unreachable: makes this an async generator that yields nothing


class FileSource:
    """One JSONL or CSV file (by suffix), read once.

    Stops between lines when ``stop`` is set; a later run re-reads the file from the start.
    """

    def __init__(self, path: Path | str, *, fmt: InputFormat | None = None) -> None:
        self.path = Path(path)
        self.format: InputFormat = fmt or input_format(self.path)

    def check(self) -> None:
        """Raise :class:`ConfigError` unless the file exists and is readable."""
        why = _unreadable(self.path)
        if why is not None:
            raise ConfigError(f"--input {self.path}: {why}")

    def records(self) -> int:
        """How many records the file holds: its non-empty lines, a CSV's header not counted
        (the total a progress bar runs to; read in binary, a fraction of parsing's cost)."""
        with self.path.open("rb") as f:
            lines = sum(1 for line in f if line.strip())
        return max(0, lines - 1) if self.format == "csv" else lines

    async def batches(self, *, stop: asyncio.Event, reject: RejectCallback,
                      max_items: int) -> AsyncIterator[list[MarketInsight]]:
        """Yield the file's good lines in order; report the bad ones."""
        for batch in good_chunks(read_insights(self.path, fmt=self.format), stop=stop,
                                 reject=reject, size=max_items):
            yield batch


def good_chunks(records: Iterable[T | Rejection], *, stop: asyncio.Event,
                reject: RejectCallback, size: int) -> Iterator[list[T]]:
    """``records`` in lists of ``size`` (the last one shorter), each :class:`Rejection`
    among them reported through ``reject``; what is gathered when ``stop`` is set comes
    last."""
    chunk: list[T] = []
    for record in records:
        if stop.is_set():
            break
        if isinstance(record, Rejection):
            reject(record)
            continue
        chunk.append(record)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _unreadable(path: Path) -> str | None:
    try:
        with path.open("rb"):
            pass
    except FileNotFoundError:
        return "does not exist"
    except IsADirectoryError:
        return "is a directory, not a file"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None


@dataclass(frozen=True, slots=True)
class WatchedFile:
    """What became of one file a :class:`WatchSource` took."""

    path: Path  # where it lies now (done/ or rejected/)
    insights: int
    rejections: int
    rejected_lines: Path | None  # the bad lines, in rejected/
    error_file: Path | None  # the .err listing line and error per bad line


class WatchSource:
    """A drop directory: every new ``*.jsonl`` / ``*.csv`` file in it is read once.

    The directory is scanned every ``poll_interval`` seconds. A file is taken once its size
    and modification time held still across two scans, so a file still being written is left
    alone (writing to a dot-name or another suffix and renaming it in is safest). A taken file
    first moves to ``processing/``, so a producer may drop a new file of the same name at
    once; it is read whole, even if ``stop`` comes meanwhile, so no file is half-sent and then
    read again; then it moves to ``done/``. Its bad lines are copied to ``rejected/<name>``
    (for CSV after the header, so the fixed file can be dropped in again), with
    ``rejected/<name>.err`` naming line and error; a file whose header is unusable, or that
    cannot be read, moves to ``rejected/`` whole. Names already taken in ``done/`` or
    ``rejected/`` get a time stamp. A file left in ``processing/`` (the agent was killed, or
    stopped while its outbox refused writes) is read again first on the next start; what it
    sent before is then sent twice. One agent per directory.
    """

    def __init__(self, directory: Path | str, *, poll_interval: float = 1.0,
                 on_file: Callable[[WatchedFile], None] | None = None) -> None:
        if not poll_interval > 0:
            raise ConfigError(f"poll interval must be positive, got {poll_interval}")
        self.directory = Path(directory)
        self.processing_dir = self.directory / "processing"
        self.done_dir = self.directory / "done"
        self.rejected_dir = self.directory / "rejected"
        self.poll_interval = poll_interval
        self._on_file = on_file
        self._prepare: ChunkPreparer | None = None
        self._sizes: dict[Path, tuple[int, int]] = {}
        self._stuck: dict[Path, tuple[int, int]] = {}

    def check(self) -> None:
        """Raise :class:`ConfigError` unless the directory exists; create its sub-directories
        ``processing/``, ``done/`` and ``rejected/``."""
        if not self.directory.is_dir():
            raise ConfigError(f"--watch {self.directory}: not a directory")
        try:
            for sub in (self.processing_dir, self.done_dir, self.rejected_dir):
                sub.mkdir(exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--watch {self.directory}: cannot create processing/, done/ "
                              f"and rejected/ ({exc.strerror or exc})") from exc

    def prepare_with(self, prepare: ChunkPreparer) -> None:
        """Have ``prepare`` (the agent's worker processes) parse, filter and seal each file's
        lines; its chunks are yielded in file order, and a file moves on only once all of
        them were stored."""
        self._prepare = prepare

    def ready_files(self) -> list[Path]:
        """Input files that held still since the previous call, oldest first."""
        seen = _input_files(self.directory)
        ready = [p for p, sig in seen.items()
                 if self._sizes.get(p) == sig and self._stuck.get(p) != sig]
        self._sizes = seen
        self._stuck = {p: s for p, s in self._stuck.items() if p in seen}
        return sorted(ready, key=lambda p: (seen[p][1], p.name))

    async def batches(self, *, stop: asyncio.Event, reject: RejectCallback,
                      max_items: int) -> AsyncIterator[list[MarketInsight] | PreparedChunk]:
        """Yield the good lines of each new file until ``stop`` is set."""
        self.check()
        leftovers = _input_files(self.processing_dir)
        for path in sorted(leftovers, key=lambda p: (leftovers[p][1], p.name)):
            if stop.is_set():
                return
            log.warning("%s was being read when an earlier run stopped; reading it again "
                        "(what it sent then is sent twice)", path)
            async for batch in self._read(path, reject, max_items):
                yield batch
        while not stop.is_set():
            for path in self.ready_files():
                if stop.is_set():
                    return
                claimed = self._claim(path)
                if claimed is not None:
                    async for batch in self._read(claimed, reject, max_items):
                        yield batch
            # Waiting on the event, not sleeping, so a stop request ends the wait at once.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.poll_interval)

    def _claim(self, path: Path) -> Path | None:
        try:
            claimed = _free_name(self.processing_dir, path.name)
            os.replace(path, claimed)
        except OSError as exc:
            # Remember it unchanged, or every scan would log the same failure.
            log.warning("cannot take %s: %s", path, exc)
            sig = _signature(path)
            if sig is not None:
                self._stuck[path] = sig
            return None
        return claimed

    async def _read(self, path: Path, reject: RejectCallback,
                    max_items: int) -> AsyncIterator[list[MarketInsight] | PreparedChunk]:
        bad: list[Rejection] = []
        count = 0
        batch: list[MarketInsight] = []

        def note(rejection: Rejection) -> None:
            bad.append(rejection)
            reject(rejection)
        try:
            if self._prepare is not None:
                # Never set: a taken file is read whole (see the class).
                whole = asyncio.Event()
                async for chunk in self._prepare(RecordFile(path, name=path.name), stop=whole,
                                                 reject=note, size=max_items):
                    count += chunk.read
                    yield chunk
            else:
                for record in read_insights(path, name=path.name):
                    if isinstance(record, Rejection):
                        note(record)
                        continue
                    count += 1
                    batch.append(record)
                    if len(batch) >= max_items:
                        yield batch
                        batch = []
        except OSError as exc:
            note(Rejection(path.name, 0, f"cannot read the file: {exc.strerror or exc}",
                           fatal=True))
        if batch:
            yield batch
        # Only after the last line: if the consumer stops early (closing this generator) the
        # file stays in processing/ to be read again.
        try:
            outcome = self._file_away(path, count, bad)
        except OSError as exc:
            log.error("cannot move %s out of %s (%s); it will be read again on the next "
                      "start", path, self.processing_dir, exc)
            return
        log.info("%s: %d insight(s), %d rejected line(s) -> %s", path.name, count, len(bad),
                 outcome.path)
        if self._on_file is not None:
            self._on_file(outcome)

    def _file_away(self, path: Path, count: int, bad: list[Rejection]) -> WatchedFile:
        fatal = any(r.fatal for r in bad)
        dest = _free_name(self.rejected_dir if fatal else self.done_dir, path.name)
        header = (csv_header_line(path) if bad and not fatal
                  and input_format(path) == "csv" else None)
        os.replace(path, dest)
        lines_file = err_file = None
        if bad:
            err_file = _free_name(self.rejected_dir, f"{path.name}.err")
            notes = [f"# {path.name}: {len(bad)} rejected line(s); line numbers refer to {dest}"]
            notes += [f"{path.name}:{r.line}: {r.error}" for r in bad]
            atomic_write(err_file, "\n".join(notes) + "\n")
            if not fatal:
                lines_file = _free_name(self.rejected_dir, path.name)
                body = [header] if header is not None else []
                body += [r.text for r in bad]
                atomic_write(lines_file, "\n".join(body) + "\n")
        return WatchedFile(path=dest, insights=count, rejections=len(bad),
                           rejected_lines=lines_file, error_file=err_file)


def _input_files(directory: Path) -> dict[Path, tuple[int, int]]:
    """The input files in ``directory`` (no dot-names), each with its :func:`_signature`."""
    found: dict[Path, tuple[int, int]] = {}
    try:
        entries = list(directory.iterdir())
    except OSError as exc:
        log.warning("cannot list %s: %s", directory, exc)
        return found
    for path in entries:
        if path.name.startswith(".") or path.suffix.lower() not in INPUT_SUFFIXES:
            continue
        sig = _signature(path)
        if sig is not None:
            found[path] = sig
    return found


def _signature(path: Path) -> tuple[int, int] | None:
    """``(size, mtime_ns)`` of a plain file; None if it vanished or is something else."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


def _free_name(directory: Path, name: str) -> Path:
    """``directory/name``, or a time-stamped variant of it that does not exist yet."""
    target = directory / name
    if not target.exists():
        return target
    stem, dot, suffix = name.partition(".")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    for n in range(1000):
        extra = f"-{n}" if n else ""
        candidate = directory / f"{stem}-{stamp}{extra}{dot}{suffix}"
        if not candidate.exists():
            return candidate
    raise OSError(f"no free name for {name} in {directory}")
