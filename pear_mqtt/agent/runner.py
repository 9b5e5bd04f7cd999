"""The edge store agent: read insights from a store's systems and share them.

One agent runs per store (a till server, a shop PC, a Raspberry Pi). It reads
:class:`~pear_mqtt.types.MarketInsight` records from one :class:`InsightSource`:

- :class:`FileSource`: one JSONL or CSV file, read once;
- :class:`WatchSource`: a drop directory; each new ``*.jsonl`` / ``*.csv`` file is read once
  and moved to ``DIR/done/``; bad lines go to ``DIR/rejected/`` with an ``.err`` file;
- :class:`SimulatedSource`: realistic, seeded store data for demos and load tests.

Every insight goes through :class:`~pear_mqtt.network.PearNetwork`, which starts offline
(``connect(wait=False)``) and keeps everything in its on-disk outbox until the broker has
acknowledged it, so a store with a flaky uplink loses nothing. :func:`run_agent` returns an
:class:`AgentReport` once the source is exhausted or ``stop`` is set, after trying to flush
for up to ``drain_timeout`` seconds. The ``pear-mqtt agent`` command wraps it with signal
handling (SIGTERM/SIGINT stop it cleanly).

Input records are one per line. JSONL lines are :class:`MarketInsight` objects as JSON; CSV
files have a header naming some of :data:`CSV_COLUMNS` (``category``, ``window_start`` and
``window_end`` are required) and empty cells mean "absent". A bad line is reported with
``file:line`` and the validation error, counted, and skipped; it never stops the agent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import gc
import json
import logging
import math
import os
import random
import re
import signal
import stat
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, Protocol, TextIO

from pydantic import ValidationError

from ..config.manager import NetworkConfigManager
from ..config.models import NetworkConfig
from ..errors import ConfigError, OutboxError, PearError, PKIError, PrivacyError, TopicError
from ..files import atomic_write
from ..model.insight import Health, MarketInsight, NetworkStatus
from ..model.topics import validate_identifier

if TYPE_CHECKING:
    from ..node.network import PearNetwork

__all__ = [
    "CSV_COLUMNS",
    "AgentReport",
    "FileSource",
    "InsightSource",
    "RejectCallback",
    "Rejection",
    "SimulatedSource",
    "WatchSource",
    "default_outbox_path",
    "input_format",
    "load_agent_config",
    "read_insights",
    "register_cli",
    "run_agent",
]

log = logging.getLogger(__name__)

InputFormat = Literal["jsonl", "csv"]

_SUFFIX_FORMATS: dict[str, InputFormat] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
_MAX_LINE_BYTES = 1024 * 1024  # an insight is a few hundred bytes; longer lines are garbage
_MAX_REPORTED_REJECTIONS = 100  # kept in the report; every one is still logged and counted
_DRAIN_POLL = 0.05  # s between outbox-depth checks while draining
_OUTBOX_RETRY_MIN, _OUTBOX_RETRY_MAX = 1.0, 30.0  # s between tries while the outbox refuses

CSV_COLUMNS: tuple[str, ...] = (
    "category", "product_id", "region", "window_start", "window_end",
    "currency", "price", "min_price", "max_price",
    "units", "revenue", "transactions",
    "price_change_pct", "demand_change_pct", "direction",
    "sample_size",
)
"""The columns a CSV input may have, in their conventional order."""

_CSV_REQUIRED = ("category", "window_start", "window_end")
_CSV_TOP = ("category", "product_id", "region", "window_start", "window_end", "sample_size")
# (group, columns that carry its content); price_data's currency alone shares nothing, so it
# only qualifies a group that has a number.
_CSV_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("price_data", ("price", "min_price", "max_price")),
    ("sales_data", ("units", "revenue", "transactions")),
    ("trends", ("price_change_pct", "demand_change_pct", "direction")),
)


# -- input parsing ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Rejection:
    """One input line that did not become an insight.

    ``fatal`` means the rest of the file was not read (an unusable CSV header). ``text`` is
    the raw line, kept so a watch directory can hand the bad lines back for fixing.
    """

    source: str
    line: int
    error: str
    text: str = field(default="", repr=False)
    fatal: bool = False

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.error}"


RejectCallback = Callable[[Rejection], None]


def input_format(path: Path) -> InputFormat:
    """The input format of ``path`` by its suffix: ``.jsonl``/``.ndjson`` or ``.csv``."""
    fmt = _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"{path}: unsupported input suffix {path.suffix or '(none)'!r}; "
                          f"use {', '.join(_SUFFIX_FORMATS)}")
    return fmt


def _describe(exc: ValidationError, *, csv_names: bool) -> str:
    """A one-line summary of ``exc``: ``field: rule`` for each problem."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        if csv_names and len(loc) == 2 and loc[0] in ("price_data", "sales_data", "trends"):
            loc = loc[1:]  # CSV users know the column, not the nested model
        msg = str(err["msg"]).removeprefix("Value error, ")
        where = ".".join(loc)
        got = err.get("input")
        shown = ""
        if err["type"] not in ("missing", "value_error") and isinstance(got, str | int | float):
            text = repr(got)
            shown = f" (got {text if len(text) <= 40 else text[:37] + '...'})"
        parts.append(f"{where}: {msg}{shown}" if where else f"{msg}{shown}")
    return "; ".join(parts)


def _lines(fh: IO[bytes]) -> Iterator[tuple[int, bytes | None]]:
    """``(line number, raw line)``; ``None`` for a line over the length limit (skipped)."""
    lineno = 0
    while True:
        raw = fh.readline(_MAX_LINE_BYTES + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > _MAX_LINE_BYTES and not raw.endswith(b"\n"):
            # Read the monster line in bounded pieces rather than into memory.
            while raw and not raw.endswith(b"\n"):
                raw = fh.readline(_MAX_LINE_BYTES)
            yield lineno, None
            continue
        yield lineno, raw


def _decode(raw: bytes, lineno: int) -> str:
    text = raw.decode("utf-8")
    if lineno == 1:
        text = text.removeprefix("\ufeff")  # spreadsheet exports start with a BOM
    return text.rstrip("\r\n")


def _parse_json_line(text: str) -> MarketInsight:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    try:
        return MarketInsight.model_validate(data)
    except ValidationError as exc:
        raise ValueError(_describe(exc, csv_names=False)) from None


def _csv_header(text: str) -> list[str]:
    names = [c.strip().lower() for c in next(csv.reader([text]))]
    unknown = [n for n in names if n not in CSV_COLUMNS]
    if unknown:
        raise ValueError(f"unknown column(s) {unknown}; known: {', '.join(CSV_COLUMNS)}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate column(s) {dupes}")
    missing = [n for n in _CSV_REQUIRED if n not in names]
    if missing:
        raise ValueError(f"missing required column(s) {missing}")
    return names


def _parse_csv_line(text: str, header: list[str]) -> MarketInsight:
    cells = next(csv.reader([text]))
    if len(cells) != len(header):
        raise ValueError(f"expected {len(header)} cells (as in the header), got {len(cells)}")
    row = {name: cell.strip() for name, cell in zip(header, cells, strict=True) if cell.strip()}
    # Strings go to pydantic unconverted: its lax mode parses numbers and ISO dates and names
    # the field when it cannot.
    data: dict[str, Any] = {k: row[k] for k in _CSV_TOP if k in row}
    for group, columns in _CSV_GROUPS:
        values = {c: row[c] for c in columns if c in row}
        if values:
            if group == "price_data" and "currency" in row:
                values["currency"] = row["currency"]
            data[group] = values
    try:
        return MarketInsight.model_validate(data)
    except ValidationError as exc:
        raise ValueError(_describe(exc, csv_names=True)) from None


def read_insights(path: Path, *, fmt: InputFormat | None = None,
                  name: str | None = None) -> Iterator[MarketInsight | Rejection]:
    """Parse ``path`` line by line: an insight per good line, a :class:`Rejection` per bad one.

    ``fmt`` defaults to :func:`input_format`; ``name`` is how rejections name the file
    (default: the path). Blank lines are skipped. Lines must be UTF-8; one record per line
    (CSV fields with embedded line breaks are not supported). An unusable CSV header yields
    one fatal rejection and ends the file. Raises :class:`OSError` if the file cannot be read.
    """
    fmt = fmt or input_format(path)
    label = name or str(path)
    header: list[str] | None = None
    with path.open("rb") as fh:
        for lineno, raw in _lines(fh):
            if raw is None:
                yield Rejection(label, lineno, f"line longer than {_MAX_LINE_BYTES} bytes")
                continue
            try:
                text = _decode(raw, lineno)
            except UnicodeDecodeError as exc:
                yield Rejection(label, lineno, f"not UTF-8 text (byte {exc.start + 1} of the "
                                               "line)", text=raw.decode("utf-8", "replace"))
                continue
            if not text.strip():
                continue
            if fmt == "csv" and header is None:
                try:
                    header = _csv_header(text)
                except (ValueError, csv.Error) as exc:
                    yield Rejection(label, lineno, f"CSV header: {exc}", text=text, fatal=True)
                    return
                continue
            try:
                if header is None:
                    yield _parse_json_line(text)
                else:
                    yield _parse_csv_line(text, header)
            except (ValueError, csv.Error) as exc:
                yield Rejection(label, lineno, str(exc), text=text)


def _csv_header_text(path: Path) -> str | None:
    """The first non-blank line of ``path`` (for a rejected-lines file that can be re-dropped)."""
    with contextlib.suppress(OSError, UnicodeDecodeError), path.open("rb") as fh:
        for lineno, raw in _lines(fh):
            if raw is not None:
                text = _decode(raw, lineno)
                if text.strip():
                    return text
    return None


# -- sources ----------------------------------------------------------------------------------

class InsightSource(Protocol):
    """Where an agent's insights come from.

    ``insights`` yields valid insights and reports each bad record through ``reject``. It must
    end soon after ``stop`` is set (a source may finish a unit of work first, as
    :class:`WatchSource` finishes the file at hand) and may end on its own (a file is read).
    """

    def insights(self, *, stop: asyncio.Event,
                 reject: RejectCallback) -> AsyncIterator[MarketInsight]:
        """Yield insights until the source is exhausted or ``stop`` is set."""
        ...


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

    async def insights(self, *, stop: asyncio.Event,
                       reject: RejectCallback) -> AsyncIterator[MarketInsight]:
        """Yield the file's good lines in order; report the bad ones."""
        for record in read_insights(self.path, fmt=self.format):
            if stop.is_set():
                return
            if isinstance(record, Rejection):
                reject(record)
            else:
                yield record


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

    def ready_files(self) -> list[Path]:
        """Input files that held still since the previous call, oldest first."""
        seen = _input_files(self.directory)
        ready = [p for p, sig in seen.items()
                 if self._sizes.get(p) == sig and self._stuck.get(p) != sig]
        self._sizes = seen
        self._stuck = {p: s for p, s in self._stuck.items() if p in seen}
        return sorted(ready, key=lambda p: (seen[p][1], p.name))

    async def insights(self, *, stop: asyncio.Event,
                       reject: RejectCallback) -> AsyncIterator[MarketInsight]:
        """Yield the good lines of each new file until ``stop`` is set."""
        self.check()
        leftovers = _input_files(self.processing_dir)
        for path in sorted(leftovers, key=lambda p: (leftovers[p][1], p.name)):
            if stop.is_set():
                return
            log.warning("%s was being read when an earlier run stopped; reading it again "
                        "(what it sent then is sent twice)", path)
            async for insight in self._read(path, reject):
                yield insight
        while not stop.is_set():
            for path in self.ready_files():
                if stop.is_set():
                    return
                claimed = self._claim(path)
                if claimed is not None:
                    async for insight in self._read(claimed, reject):
                        yield insight
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

    async def _read(self, path: Path, reject: RejectCallback) -> AsyncIterator[MarketInsight]:
        bad: list[Rejection] = []
        count = 0
        try:
            for record in read_insights(path, name=path.name):
                if isinstance(record, Rejection):
                    bad.append(record)
                    reject(record)
                else:
                    count += 1
                    yield record
        except OSError as exc:
            failure = Rejection(path.name, 0, f"cannot read the file: {exc.strerror or exc}",
                                fatal=True)
            bad.append(failure)
            reject(failure)
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
        header = (_csv_header_text(path) if bad and not fatal
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
        if path.name.startswith(".") or path.suffix.lower() not in _SUFFIX_FORMATS:
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




# -- simulation -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _CategoryModel:
    category: str
    base_price: float  # regular shelf price, mean over the category's products
    peak_units: float  # units per hour at the busiest hour of a weekday
    spread: float  # how far the category's product prices lie around the mean (fraction)
    elasticity: float  # units respond to a price cut as (regular / actual) ** elasticity
    basket: float  # units of the category per transaction


_CATALOGUE: tuple[_CategoryModel, ...] = (
    _CategoryModel("grocery/dairy", 1.89, 60.0, 0.35, 1.6, 1.8),
    _CategoryModel("grocery/bakery", 2.49, 45.0, 0.40, 1.4, 1.5),
    _CategoryModel("household/cleaning", 4.79, 12.0, 0.45, 2.0, 1.3),
    _CategoryModel("electronics/audio", 59.90, 1.2, 0.70, 2.5, 1.0),
    _CategoryModel("grocery/produce", 2.99, 80.0, 0.50, 1.3, 2.5),
    _CategoryModel("beverages/soft-drinks", 1.59, 70.0, 0.30, 2.2, 3.0),
    _CategoryModel("personal-care/hygiene", 3.99, 10.0, 0.50, 1.8, 1.4),
    _CategoryModel("electronics/accessories", 14.99, 3.5, 0.60, 2.0, 1.1),
    _CategoryModel("apparel/basics", 12.99, 4.0, 0.45, 1.9, 1.6),
    _CategoryModel("pet/food", 8.49, 8.0, 0.40, 1.2, 1.7),
    _CategoryModel("toys/games", 24.99, 1.8, 0.55, 2.3, 1.1),
    _CategoryModel("garden/tools", 19.99, 1.5, 0.50, 1.7, 1.0),
)

_OPEN_HOUR, _CLOSE_HOUR = 7, 22  # a store reports only the hours it is open
_WEEKDAY_FACTOR = (0.95, 0.9, 0.95, 1.0, 1.15, 1.3, 0.7)  # Monday .. Sunday
_PROMO_CHANCE = 0.06  # per category and opening day
_FLAT_PCT = 0.5  # price moves smaller than this (percent) count as "flat"


@dataclass(slots=True)
class _CategoryState:
    walk: float = 0.0  # log deviation of the regular price from the base price
    promo_until: datetime | None = None
    discount: float = 0.0
    last_price: float | None = None
    last_units: float | None = None


def _hour_profile(hour: int) -> float:
    """Share of the peak hourly demand: a lunch peak and a larger after-work peak."""
    mid = hour + 0.5
    lunch = 0.8 * math.exp(-((mid - 12.5) ** 2) / (2 * 1.5**2))
    evening = math.exp(-((mid - 17.5) ** 2) / (2 * 2.0**2))
    return 0.2 + 0.8 * max(lunch, evening)


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 50:  # Knuth's method needs O(lam) draws; the normal approximation is fine here
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


class SimulatedSource:
    """Plausible hourly insights from one simulated store.

    ``categories`` (1 to 12) picks categories such as ``grocery/dairy``, ``grocery/bakery``,
    ``household/cleaning`` and ``electronics/audio``. Each open hour (07:00 to 22:00 UTC, from
    ``start``; by default far enough back that the ``count`` insights' windows end by today,
    or a week back for an endless run) gives one insight per category: the regular price
    follows a slow mean-reverting random walk around the category's base price; promotions
    (a few per category and month, one to three days, 10 to 30 % off) lower the price and
    raise the units; units follow a lunch and an after-work peak and the day of the week;
    min/max prices span the category's products; trends compare with the previous hour.

    The same ``seed`` and ``start`` give the same insights; without a seed one is drawn and
    kept in :attr:`seed` so a run can be replayed. ``rate`` paces :meth:`insights` (per
    second; 0 means as fast as possible); ``count`` ends it (None: never).
    """

    def __init__(self, *, seed: int | None = None, rate: float = 1.0, count: int | None = None,
                 categories: int = 8, region: str = "global", currency: str = "EUR",
                 start: datetime | None = None) -> None:
        if not (rate >= 0 and math.isfinite(rate)):
            raise ConfigError(f"--rate must be a finite number >= 0, got {rate}")
        if count is not None and count < 0:
            raise ConfigError(f"--count must be >= 0, got {count}")
        if not 1 <= categories <= len(_CATALOGUE):
            raise ConfigError(f"--categories must be between 1 and {len(_CATALOGUE)}, "
                              f"got {categories}")
        if start is not None and start.tzinfo is None:
            raise ConfigError("the simulation start must be timezone-aware")
        try:
            validate_identifier(region, what="region")
        except TopicError as exc:
            raise ConfigError(f"--region: {exc}") from None
        if re.fullmatch(r"[A-Z]{3}", currency) is None:
            raise ConfigError(f"currency must be a three-letter ISO code, got {currency!r}")
        self.seed = seed if seed is not None else random.SystemRandom().randrange(2**32)
        self.rate = rate
        self.count = count
        self.categories = tuple(m.category for m in _CATALOGUE[:categories])
        self.region = region
        self.currency = currency
        if start is None:
            # Far enough back that the windows lie in the past, as a store reporting its
            # history would have them, rather than running ahead of the clock.
            open_hours = _CLOSE_HOUR - _OPEN_HOUR
            days = (7 if count is None else
                    max(1, -(-count // (categories * open_hours))))
            start = datetime.now(UTC).replace(hour=0) - timedelta(days=days)
        self.start = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)

    def generate(self) -> Iterator[MarketInsight]:
        """The insights in order, without pacing: ``count`` of them, or endless."""
        rng = random.Random(self.seed)
        models = _CATALOGUE[:len(self.categories)]
        states = [_CategoryState() for _ in models]
        produced = 0
        hour = self.start
        while True:
            if _OPEN_HOUR <= hour.hour < _CLOSE_HOUR:
                for model, state in zip(models, states, strict=True):
                    if self.count is not None and produced >= self.count:
                        return
                    yield self._observe(rng, model, state, hour)
                    produced += 1
            elif self.count is not None and produced >= self.count:
                return
            hour += timedelta(hours=1)

    def _observe(self, rng: random.Random, model: _CategoryModel, state: _CategoryState,
                 hour: datetime) -> MarketInsight:
        end = hour + timedelta(hours=1)
        if state.promo_until is not None and hour >= state.promo_until:
            state.promo_until, state.discount = None, 0.0
        if state.promo_until is None and hour.hour == _OPEN_HOUR \
                and rng.random() < _PROMO_CHANCE:
            days = rng.randint(1, 3)
            state.promo_until = hour.replace(hour=_CLOSE_HOUR) + timedelta(days=days - 1)
            state.discount = rng.uniform(0.10, 0.30)
        state.walk = 0.97 * state.walk + rng.gauss(0.0, 0.004)
        regular = model.base_price * math.exp(state.walk)
        price = round(regular * (1.0 - state.discount), 2)
        lam = (model.peak_units * _hour_profile(hour.hour) * _WEEKDAY_FACTOR[hour.weekday()]
               * (regular / price) ** model.elasticity * math.exp(rng.gauss(0.0, 0.15)))
        units = _poisson(rng, lam)
        transactions = min(units, round(units / (model.basket * rng.uniform(0.8, 1.2))))
        if units and not transactions:
            transactions = 1
        low = price * (1.0 - model.spread * rng.uniform(0.6, 1.0))
        high = regular * (1.0 + model.spread * rng.uniform(0.6, 1.0))
        min_price = min(price, math.floor(low * 100) / 100)
        max_price = max(price, math.ceil(high * 100) / 100)
        price_change = demand_change = None
        direction: Literal["up", "down", "flat"] | None = None
        if state.last_price is not None:
            price_change = round((price / state.last_price - 1.0) * 100.0, 2)
            direction = ("up" if price_change > _FLAT_PCT else
                         "down" if price_change < -_FLAT_PCT else "flat")
        if state.last_units:
            demand_change = round((units / state.last_units - 1.0) * 100.0, 2)
        state.last_price, state.last_units = price, float(units)
        data: dict[str, Any] = {
            "category": model.category, "region": self.region,
            "window_start": hour, "window_end": end,
            "price_data": {"currency": self.currency, "price": price,
                           "min_price": max(0.01, min_price), "max_price": max_price},
            "sales_data": {"units": float(units), "revenue": round(units * price, 2),
                           "transactions": float(transactions)},
            "trends": {"price_change_pct": price_change, "demand_change_pct": demand_change,
                       "direction": direction},
            "sample_size": max(1, transactions),
        }
        try:
            return MarketInsight.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"simulation: {_describe(exc, csv_names=False)}") from None

    async def insights(self, *, stop: asyncio.Event,
                       reject: RejectCallback) -> AsyncIterator[MarketInsight]:
        """Yield :meth:`generate`'s insights at ``rate`` per second until done or stopped."""
        loop = asyncio.get_running_loop()
        interval = 1.0 / self.rate if self.rate > 0 else 0.0
        due = loop.time()
        for insight in self.generate():
            delay = due - loop.time()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return
            yield insight
            # After a stall (a slow disk, a suspended laptop) carry on at the rate rather
            # than bursting out everything that fell due meanwhile.
            due = max(due + interval, loop.time() - interval)


class _NoSource:
    """Reads nothing: the agent only delivers what its outbox holds (``--drain-only``)."""

    async def insights(self, *, stop: asyncio.Event,
                       reject: RejectCallback) -> AsyncIterator[MarketInsight]:
        return
        yield  # unreachable: makes this an async generator that yields nothing


# -- the agent --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class AgentReport:
    """What one :func:`run_agent` run did.

    ``read``: insights the source produced; ``rejected``: input lines that were not insights;
    ``sent``: insights accepted into the outbox (delivery is confirmed when ``outbox_depth``
    reaches 0); ``failed``: insights the privacy filter refused. ``drained`` is true when the
    outbox was empty at the end; otherwise its ``outbox_depth`` rows wait on disk for the next
    run. ``stopped`` is true when ``stop`` ended the run rather than the source running out.
    """

    read: int
    sent: int
    rejected: int
    failed: int
    outbox_depth: int
    drained: bool
    stopped: bool
    duration: float
    status: NetworkStatus
    rejections: tuple[Rejection, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (at most the first 100 rejections are listed)."""
        return {"read": self.read, "sent": self.sent, "rejected": self.rejected,
                "failed": self.failed, "outbox_depth": self.outbox_depth,
                "drained": self.drained, "stopped": self.stopped,
                "duration": round(self.duration, 3),
                "rejections": [str(r) for r in self.rejections],
                "status": self.status.model_dump(mode="json")}


@dataclass(slots=True)
class _Tally:
    read: int = 0
    sent: int = 0
    rejected: int = 0
    failed: int = 0
    rejections: list[Rejection] = field(default_factory=list)

    def reject(self, rejection: Rejection) -> None:
        self.rejected += 1
        if len(self.rejections) < _MAX_REPORTED_REJECTIONS:
            self.rejections.append(rejection)
        log.warning("rejected %s", rejection)


def default_outbox_path(*, config: NetworkConfig, config_file: Path | None) -> Path:
    """``.pear/outbox-<node_id>.sqlite`` next to ``config_file`` (else the working directory)."""
    # Absolute, so messages name a path that means the same from any working directory.
    base = config_file.resolve().parent if config_file is not None else Path.cwd()
    return base / ".pear" / f"outbox-{config.node_id}.sqlite"


def load_agent_config(*, file: Path | None, outbox: Path | None = None) -> NetworkConfig:
    """The agent's configuration: :meth:`NetworkConfigManager.load` plus an outbox on disk.

    The outbox is ``outbox`` if given, else the config's ``reliability.outbox_path``, else
    :func:`default_outbox_path`. The result passes ``validate(for_connect=True)``.
    """
    config = NetworkConfigManager.load(file=file)
    path = outbox or config.reliability.outbox_path \
        or default_outbox_path(config=config, config_file=file)
    if path != config.reliability.outbox_path:
        rel = config.reliability.model_copy(update={"outbox_path": path})
        config = config.model_copy(update={"reliability": rel})
    return NetworkConfigManager.validate(config, for_connect=True)


def _status_line(tally: _Tally, status: NetworkStatus) -> str:
    return (f"pear-mqtt agent: read={tally.read} sent={tally.sent} rejected={tally.rejected} "
            f"failed={tally.failed} outbox={status.outbox_depth} "
            f"connected={'yes' if status.connected else 'no'} "
            f"dropped={sum(status.dropped.values())} health={status.health.value}")


class _StatusWriter:
    def __init__(self, *, path: Path | None, stream: TextIO | None) -> None:
        self._path = path
        self._stream = stream
        self._warned = False

    def write(self, tally: _Tally, status: NetworkStatus, *, line: bool = True) -> None:
        if line and self._stream is not None:
            print(_status_line(tally, status), file=self._stream, flush=True)
        if self._path is None:
            return
        try:
            # Readers (health checks) must never see a half-written file.
            atomic_write(self._path, status.model_dump_json(indent=2) + "\n", fsync=False)
        except OSError as exc:
            if not self._warned:  # once: a full disk would otherwise flood the log
                log.warning("cannot write the status file %s: %s", self._path, exc)
                self._warned = True


async def _drain(net: PearNetwork, timeout: float) -> bool:
    """Wait up to ``timeout`` s for an empty outbox; true if it emptied."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while net.status().outbox_depth > 0:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        try:
            await asyncio.wait_for(net.flush(), min(remaining, 1.0))
        except TimeoutError:
            continue
        # flush() only tracks what this process broadcast, so rows an earlier run left in
        # the outbox can remain after it returns: fall back to polling the depth.
        await asyncio.sleep(min(_DRAIN_POLL, max(0.0, deadline - loop.time())))
    return True


async def run_agent(*, config: NetworkConfig, source: InsightSource, stop: asyncio.Event,
                    status_interval: float = 10.0, status_file: Path | None = None,
                    drain_timeout: float = 10.0,
                    status_stream: TextIO | None = None) -> AgentReport:
    """Publish everything ``source`` yields until it ends or ``stop`` is set.

    Joins the network without waiting for the broker (insights wait in the outbox at
    ``config.reliability.outbox_path``, which must be set). Every ``status_interval`` seconds
    (0: never) prints a status line to ``status_stream`` (default ``sys.stderr``) and replaces
    ``status_file`` with the :class:`NetworkStatus` as JSON; the file is also written at the
    start and at the end (then with ``connected: false``). At the end it waits up to
    ``drain_timeout`` seconds for the outbox to empty, then disconnects: what is left stays in
    the outbox for the next run.

    Bad input lines are counted and logged, never raised. While the outbox refuses writes (a
    full disk) the source is held at the current insight and the write retried with backoff.
    Raises :class:`ConfigError` for an unusable config and
    :class:`~pear_mqtt.errors.OutboxError` if the outbox cannot be opened (e.g. another
    process holds it).
    """
    if config.reliability.outbox_path is None:
        raise ConfigError("reliability.outbox_path: the agent keeps unsent insights on disk "
                          "and needs an outbox path (load_agent_config sets a default)")
    if status_interval < 0 or drain_timeout < 0:
        raise ConfigError("status_interval and drain_timeout must be >= 0")
    try:
        config.reliability.outbox_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"reliability.outbox_path: cannot create the directory of "
                          f"{config.reliability.outbox_path} ({exc.strerror or exc})") from exc
    # Imported here so parsing and simulation (and ``pear-mqtt --help``) work without the
    # transport stack loaded.
    from ..node.network import PearNetwork

    started = time.monotonic()
    tally = _Tally()
    writer = _StatusWriter(path=status_file,
                           stream=status_stream if status_stream is not None else sys.stderr)
    net = PearNetwork(config)
    await net.connect(wait=False)
    reporter: asyncio.Task[None] | None = None
    drained = False
    try:
        writer.write(tally, net.status(), line=False)
        if status_interval > 0:
            reporter = asyncio.create_task(_report_every(status_interval, net, tally, writer))
        await _pump(source, net, stop, tally)
        drained = await _drain(net, drain_timeout)
    finally:
        if reporter is not None:
            reporter.cancel()
            # wait(), unlike awaiting the task, does not raise its CancelledError, which could
            # not be told apart from a cancellation of this run.
            await asyncio.wait([reporter])
        # Taken before disconnecting, which closes the outbox and so zeroes its depth.
        final = net.status()
        await net.disconnect()
        final = final.model_copy(update={"connected": False, "health": Health.DOWN})
        writer.write(tally, final)
    return AgentReport(read=tally.read, sent=tally.sent, rejected=tally.rejected,
                       failed=tally.failed, outbox_depth=final.outbox_depth,
                       drained=drained and final.outbox_depth == 0, stopped=stop.is_set(),
                       duration=time.monotonic() - started, status=final,
                       rejections=tuple(tally.rejections))


async def _report_every(interval: float, net: PearNetwork, tally: _Tally,
                        writer: _StatusWriter) -> None:
    while True:
        await asyncio.sleep(interval)  # cancelled by run_agent on the way out
        writer.write(tally, net.status())


async def _pump(source: InsightSource, net: PearNetwork, stop: asyncio.Event,
                tally: _Tally) -> None:
    items = source.insights(stop=stop, reject=tally.reject)
    try:
        async for insight in items:
            tally.read += 1
            try:
                stored = await _store(net, insight, stop)
            except (PrivacyError, TopicError) as exc:
                tally.failed += 1
                log.warning("not shared (%s %s): %s", insight.category,
                            insight.window_start.isoformat(), exc)
                continue
            if not stored:
                return  # stopped while the outbox refused it: the source is not advanced
            tally.sent += 1
            # No yield of our own: broadcast hands the loop to the flusher and the status
            # reporter every millisecond, and insights read back to back get batched.
    finally:
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()


async def _store(net: PearNetwork, insight: MarketInsight, stop: asyncio.Event) -> bool:
    """Put ``insight`` into the outbox, retrying while it refuses (a full disk); false if
    ``stop`` came first."""
    delay = _OUTBOX_RETRY_MIN
    while True:
        try:
            await net.broadcast_market_insight(insight)
            return True
        except OutboxError as exc:
            # Holding the source still loses nothing: the outbox recovers once the disk has
            # room, and a stop leaves the insight (and a watched file) unread.
            log.warning("outbox refused an insight (%s); retrying in %.0f s", exc, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            return False
        delay = min(delay * 2, _OUTBOX_RETRY_MAX)


# -- command line -----------------------------------------------------------------------------

def _make_source(args: argparse.Namespace) -> InsightSource:
    if args.input is not None:
        file_source = FileSource(args.input)
        file_source.check()
        return file_source
    if args.watch is not None:
        watch = WatchSource(args.watch, poll_interval=args.poll_interval)
        watch.check()
        return watch
    if args.simulate:
        sim = SimulatedSource(seed=args.seed, rate=args.rate, count=args.count,
                              categories=args.categories, region=args.region)
        print(f"pear-mqtt agent: simulating {len(sim.categories)} categories with seed "
              f"{sim.seed}", file=sys.stderr)
        return sim
    return _NoSource()


def _cmd_agent(args: argparse.Namespace) -> int:
    try:
        config = load_agent_config(file=args.config, outbox=args.outbox)
        source = _make_source(args)
        if args.status_interval < 0 or args.drain_timeout < 0:
            raise ConfigError("--status-interval and --drain-timeout must be >= 0")
    except ConfigError as exc:
        print(f"pear-mqtt agent: {exc}", file=sys.stderr)
        return 2
    for warning in NetworkConfigManager.warnings(config):
        print(f"pear-mqtt agent: warning: {warning}", file=sys.stderr)
    # What startup loaded (modules, schemas, config) lives as long as the process. Left to the
    # cyclic collector, every full collection walks all of it: 15-40 ms with the network
    # stack loaded (measured), a pause that every insight in flight waits out.
    from ..node import network  # noqa: F401  (loaded now, so that it is frozen too)
    gc.freeze()
    return asyncio.run(_serve(args, config, source))


async def _serve(args: argparse.Namespace, config: NetworkConfig,
                 source: InsightSource) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            print(f"pear-mqtt agent: {signal.Signals(signum).name}: stopping, delivering for up "
                  f"to {args.drain_timeout:g} s (signal again to stop at once)",
                  file=sys.stderr, flush=True)
            stop.set()
        else:
            main.cancel()

    handled = (signal.SIGTERM, signal.SIGINT)
    for sig in handled:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        report = await run_agent(config=config, source=source, stop=stop,
                                 status_interval=args.status_interval,
                                 status_file=args.status_file,
                                 drain_timeout=args.drain_timeout)
    except (ConfigError, PKIError) as exc:  # PKIError: unusable certificate or key files
        print(f"pear-mqtt agent: {exc}", file=sys.stderr)
        return 2
    except PearError as exc:  # e.g. the outbox is locked by another agent
        print(f"pear-mqtt agent: {exc}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        main.uncancel()
        print("pear-mqtt agent: stopped without delivering; unsent insights stay in "
              f"{config.reliability.outbox_path}", file=sys.stderr)
        return 1
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
    where = ("everything delivered" if report.drained else
             f"{report.outbox_depth} outbox row(s) kept in {config.reliability.outbox_path}")
    print(f"pear-mqtt agent: done: read {report.read}, sent {report.sent}, rejected "
          f"{report.rejected}, failed {report.failed}; {where}", file=sys.stderr)
    print(json.dumps(report.to_dict()), flush=True)
    if args.drain_only and not report.drained:
        return 1
    return 0


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``pear-mqtt agent``."""
    parser = subparsers.add_parser(
        "agent", help="run an edge store agent that shares insights from files or a simulation",
        description=(
            "Read market insights from one source and share them through the network. The "
            "agent starts offline and keeps every insight in an on-disk outbox (SQLite) until "
            "the broker has acknowledged it: the config's reliability.outbox_path, or, if "
            "that is unset, .pear/outbox-<node_id>.sqlite next to the config file (--outbox "
            "overrides both). SIGTERM or SIGINT stops it: it stops reading, delivers for up to "
            "--drain-timeout seconds, and leaves the rest in the outbox for the next run (a "
            "second signal stops at once). Bad input lines are logged as FILE:LINE: ERROR and "
            "skipped. On exit a JSON report goes to stdout. Exit status: 0 on a clean stop, 1 "
            "if stopped by a second signal or if --drain-only left rows undelivered, 2 on "
            "configuration errors."))
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="network config (.toml or .json); PEAR_* environment variables "
                             "override it")
    src = parser.add_argument_group("source (exactly one)")
    one = src.add_mutually_exclusive_group(required=True)
    one.add_argument("--input", type=Path, metavar="FILE",
                     help="read one file once: .jsonl (a MarketInsight JSON object per line) "
                          f"or .csv (header with some of: {', '.join(CSV_COLUMNS)}; empty "
                          "cells are absent)")
    one.add_argument("--watch", type=Path, metavar="DIR",
                     help="read each new *.jsonl / *.csv file dropped into DIR once, then move "
                          "it to DIR/done/; bad lines go to DIR/rejected/ with a .err file")
    one.add_argument("--simulate", action="store_true",
                     help="generate realistic hourly store data (see --seed, --rate, --count)")
    one.add_argument("--drain-only", action="store_true",
                     help="read nothing: deliver what the outbox holds and exit (1 if rows "
                          "remain after --drain-timeout)")
    src.add_argument("--poll-interval", type=float, default=1.0, metavar="S",
                     help="--watch: seconds between directory scans (default: 1)")
    sim = parser.add_argument_group("simulation")
    sim.add_argument("--seed", type=int, default=None,
                     help="random seed (default: drawn and printed, so a run can be replayed)")
    sim.add_argument("--rate", type=float, default=1.0, metavar="R",
                     help="insights per second (0: as fast as possible; default: 1)")
    sim.add_argument("--count", type=int, default=None, metavar="N",
                     help="stop after N insights (default: run until stopped)")
    sim.add_argument("--categories", type=int, default=8, metavar="N",
                     help=f"number of product categories (1-{len(_CATALOGUE)}; default: 8)")
    sim.add_argument("--region", default="global",
                     help="region the insights are for (default: global)")
    run = parser.add_argument_group("running")
    run.add_argument("--outbox", type=Path, metavar="PATH",
                     help="outbox file (default: reliability.outbox_path, else "
                          ".pear/outbox-<node_id>.sqlite next to the config)")
    run.add_argument("--status-interval", type=float, default=10.0, metavar="S",
                     help="seconds between status lines on stderr (0: none; default: 10)")
    run.add_argument("--status-file", type=Path, metavar="PATH",
                     help="keep the current NetworkStatus as JSON in PATH (replaced "
                          "atomically), for health checks")
    run.add_argument("--drain-timeout", type=float, default=10.0, metavar="S",
                     help="seconds to keep delivering after the source ends or a stop signal "
                          "(default: 10)")
    parser.set_defaults(handler=_cmd_agent)
