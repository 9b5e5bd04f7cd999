"""Insight records from files: JSON lines or CSV, one record per line.

A bad line becomes a :class:`Rejection` naming ``file:line`` and the problem; it is counted and
skipped, never raised (only an unusable CSV header ends a file).
"""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import ValidationError

from ..errors import ConfigError
from ..model.insight import MarketInsight

__all__ = [
    "CSV_COLUMNS",
    "INPUT_SUFFIXES",
    "InputFormat",
    "RecordFile",
    "RecordParser",
    "RejectCallback",
    "Rejection",
    "csv_header_line",
    "describe_invalid",
    "input_format",
    "named",
    "read_insights",
]

InputFormat = Literal["jsonl", "csv"]

_SUFFIX_FORMATS: dict[str, InputFormat] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
INPUT_SUFFIXES: tuple[str, ...] = tuple(_SUFFIX_FORMATS)
"""The file suffixes :func:`input_format` knows (lower case)."""

_MAX_LINE_BYTES = 1024 * 1024  # an insight is a few hundred bytes; longer lines are garbage

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


def describe_invalid(exc: ValidationError, *, csv_names: bool = False) -> str:
    """A one-line summary of ``exc``: ``field: rule`` for each problem; ``csv_names`` names
    a nested field by its CSV column (``price``, not ``price_data.price``)."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        if csv_names and len(loc) == 2 and loc[0] in ("price_data", "sales_data", "trends"):
            loc = loc[1:]
        msg = str(err["msg"]).removeprefix("Value error, ")
        where = ".".join(loc)
        got = err.get("input")
        shown = ""
        if err["type"] not in ("missing", "value_error") and isinstance(got, str | int | float):
            text = repr(got)
            shown = f" (got {text if len(text) <= 40 else text[:37] + '...'})"
        parts.append(f"{where}: {msg}{shown}" if where else f"{msg}{shown}")
    return "; ".join(parts)


def named(insight: MarketInsight, why: object) -> str:
    """An insight the privacy filter refused, as the agent reports it: its category and
    window start, then why."""
    return f"{insight.category} {insight.window_start.isoformat()}: {why}"


# -- lines ------------------------------------------------------------------------------------

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


def _text_lines(fh: IO[bytes], label: str) -> Iterator[tuple[int, str] | Rejection]:
    """The non-blank lines of ``fh`` as text, and a :class:`Rejection` per unreadable line."""
    for lineno, raw in _lines(fh):
        if raw is None:
            yield Rejection(label, lineno, f"line longer than {_MAX_LINE_BYTES} bytes")
            continue
        try:
            text = _decode(raw, lineno)
        except UnicodeDecodeError as exc:
            yield Rejection(label, lineno, f"not UTF-8 text (byte {exc.start + 1} of the line)",
                            text=raw.decode("utf-8", "replace"))
            continue
        if text.strip():
            yield lineno, text


def csv_header_line(path: Path) -> str | None:
    """The first non-blank line of ``path`` (for a rejected-lines file that can be re-dropped)."""
    with contextlib.suppress(OSError, UnicodeDecodeError), path.open("rb") as fh:
        for lineno, raw in _lines(fh):
            if raw is not None:
                text = _decode(raw, lineno)
                if text.strip():
                    return text
    return None


# -- JSON lines -------------------------------------------------------------------------------

def _parse_json_line(text: str) -> MarketInsight:
    try:
        # pydantic-core parses and validates in one pass, about twice json.loads and
        # model_validate; a line it refuses is read again below to say why in the words a
        # person fixing the file needs (a JSON error's column, the fields at fault).
        return MarketInsight.model_validate_json(text)
    except ValidationError:
        pass
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    try:
        return MarketInsight.model_validate(data)
    except ValidationError as exc:
        raise ValueError(describe_invalid(exc)) from None


# -- CSV --------------------------------------------------------------------------------------

class _CsvTable:
    """One :func:`csv.reader` over a CSV file's lines, and the columns its header named.

    The reader is fed one line at a time and meets the end of its input after each (the feed
    resumes with the next line), so every line is one record: a stray quote costs its own
    line instead of swallowing the lines after it into one field.
    """

    def __init__(self, header_text: str) -> None:
        self._pending: str | None = None
        self._reader = csv.reader(self)
        self.header = self._check_header([c.strip().lower() for c in self._row(header_text)])

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        line, self._pending = self._pending, None
        if line is None:
            raise StopIteration
        return line

    def _row(self, text: str) -> list[str]:
        self._pending = text
        return next(self._reader, [])

    @staticmethod
    def _check_header(names: list[str]) -> list[str]:
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

    def insight(self, text: str) -> MarketInsight:
        """The insight on the data line ``text``; :class:`ValueError` or :class:`csv.Error`
        says why there is none."""
        cells = self._row(text)
        if len(cells) != len(self.header):
            raise ValueError(f"expected {len(self.header)} cells (as in the header), "
                             f"got {len(cells)}")
        row = {name: cell.strip() for name, cell in zip(self.header, cells, strict=True)
               if cell.strip()}
        # Strings go to pydantic unconverted: its lax mode parses numbers and ISO dates and
        # names the field when it cannot.
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
            raise ValueError(describe_invalid(exc, csv_names=True)) from None


# -- files ------------------------------------------------------------------------------------

class RecordParser:
    """Turns the data lines of one input file into insights: JSON lines, or CSV rows under the
    ``header`` line (:class:`ValueError` or :class:`csv.Error` when that is unusable).

    ``spec`` is what rebuilds an equal parser elsewhere (``RecordParser(**spec)``): a worker
    process gets it with the lines it parses."""

    def __init__(self, *, fmt: InputFormat, label: str, header: str | None = None) -> None:
        self.spec: dict[str, Any] = {"fmt": fmt, "label": label, "header": header}
        self._label = label
        self._table = _CsvTable(header or "") if fmt == "csv" else None

    def parse(self, lineno: int, text: str) -> MarketInsight | Rejection:
        """The insight on line ``lineno``, or the :class:`Rejection` saying why there is none."""
        try:
            return _parse_json_line(text) if self._table is None else self._table.insight(text)
        except (ValueError, csv.Error) as exc:
            return Rejection(self._label, lineno, str(exc), text=text)


class RecordFile:
    """One input file read line by line: :meth:`lines` gives its data lines (after a CSV's
    header, which makes :attr:`parser`) and a :class:`Rejection` per unreadable one.

    ``fmt`` defaults to :func:`input_format`; ``name`` is how rejections name the file
    (default: the path). Blank lines are skipped. Lines must be UTF-8; one record per line
    (CSV fields with embedded line breaks are not supported). An unusable CSV header yields
    one fatal rejection and ends the file.
    """

    def __init__(self, path: Path, *, fmt: InputFormat | None = None,
                 name: str | None = None) -> None:
        self.path = path
        self.format: InputFormat = fmt or input_format(path)
        self.label = name or str(path)
        self.parser: RecordParser | None = (
            None if self.format == "csv" else RecordParser(fmt="jsonl", label=self.label))

    def lines(self) -> Iterator[tuple[int, str] | Rejection]:
        """``(line number, text)`` of each data line, in order. Raises :class:`OSError` if the
        file cannot be read."""
        with self.path.open("rb") as fh:
            for item in _text_lines(fh, self.label):
                if isinstance(item, Rejection) or self.parser is not None:
                    yield item
                    continue
                lineno, text = item
                try:
                    self.parser = RecordParser(fmt="csv", label=self.label, header=text)
                except (ValueError, csv.Error) as exc:
                    yield Rejection(self.label, lineno, f"CSV header: {exc}", text=text,
                                    fatal=True)
                    return


def read_insights(path: Path, *, fmt: InputFormat | None = None,
                  name: str | None = None) -> Iterator[MarketInsight | Rejection]:
    """Parse ``path`` (see :class:`RecordFile`) line by line: an insight per good line, a
    :class:`Rejection` per bad one. Raises :class:`OSError` if the file cannot be read."""
    records = RecordFile(path, fmt=fmt, name=name)
    for item in records.lines():
        if isinstance(item, Rejection):
            yield item
        else:
            assert records.parser is not None  # made by lines() before a data line
            yield records.parser.parse(*item)
