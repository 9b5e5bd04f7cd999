"""Exports of the market store: CSV (standard library) and Parquet (pyarrow, the ``market``
extra), of insight rows or aggregate cells, with the disclosure they were received with
(pseudonyms stay pseudonyms, buckets stay buckets: a value is its ``lo``/``hi`` pair)."""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from ..errors import MarketError
from ..privacy.ranges import ValueRange
from .rows import METRICS, AggregateRow, MarketRow

__all__ = ["INSIGHT_COLUMNS", "export_rows", "insight_record"]

INSIGHT_COLUMNS: tuple[str, ...] = (
    "id", "member", "node", "item_id", "category", "region", "product_id", "window_start",
    "window_end", "received_at", "currency", "direction", "log_ref",
    *(f"{m}_{end}" for m in METRICS for end in ("lo", "hi")))


def insight_record(row: MarketRow) -> dict[str, Any]:
    """One row as flat columns (an exact value has ``lo == hi``)."""
    out: dict[str, Any] = {c: getattr(row, c) for c in INSIGHT_COLUMNS[:13]}
    for m in METRICS:
        v = row.values.get(m)
        lo, hi = ((v.lo, v.hi) if isinstance(v, ValueRange) else (v, v))
        out[f"{m}_lo"], out[f"{m}_hi"] = lo, hi
    return out


def _records(rows: Iterable[MarketRow | AggregateRow]) -> Iterator[dict[str, Any]]:
    for row in rows:
        if isinstance(row, MarketRow):
            yield insight_record(row)
        else:
            yield dataclasses.asdict(row)


def _columns(kind: Literal["insights", "aggregates"]) -> list[str]:
    if kind == "insights":
        return list(INSIGHT_COLUMNS)
    return [f.name for f in dataclasses.fields(AggregateRow)]


def export_rows(rows: Iterable[MarketRow | AggregateRow], path: Path, *,
                kind: Literal["insights", "aggregates"],
                fmt: Literal["csv", "parquet"]) -> int:
    """Write ``rows`` to ``path``; returns how many. Datetimes are ISO 8601 in CSV and
    timestamps (UTC) in Parquet."""
    columns = _columns(kind)
    if fmt == "csv":
        n = 0
        with open(path, "w", newline="", encoding="utf-8") as fh:
            out = csv.DictWriter(fh, fieldnames=columns)
            out.writeheader()
            for rec in _records(rows):
                out.writerow({k: v.isoformat() if isinstance(v, datetime) else v
                              for k, v in rec.items()})
                n += 1
        return n
    if fmt != "parquet":
        raise MarketError(f"export format must be 'csv' or 'parquet', not {fmt!r}")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MarketError("Parquet export needs pyarrow: pip install 'pear-mqtt[market]' "
                          "(or export --format csv)") from None
    data: dict[str, list[Any]] = {c: [] for c in columns}
    for rec in _records(rows):
        for c in columns:
            data[c].append(rec[c])
    pq.write_table(pa.table(data), path)
    return len(data[columns[0]])
