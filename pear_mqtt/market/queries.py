"""The market store's read path: filters, keyset-paged rows, day and week groups from the
roll-up, time series, the latest row per sender, and aggregates. Each function takes a
connection and returns typed rows (:mod:`.rows`)."""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from ..errors import MarketError
from ..privacy.ranges import ValueRange
from .rows import METRICS, AggregateRow, GroupRow, HistogramRow, MarketRow, Page, Value
from .values import unpack
from .writer import DAY

__all__ = ["Filter", "GroupBy", "aggregates", "grouped", "histograms", "latest", "page",
           "rows_after"]

GroupBy = Literal["day", "week"] | None

_ROW_COLUMNS = ("id, member, node, item_id, category, region, product, window_start, "
                "window_end, received_at, currency, direction, log_ref, vals")


def _ts(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def _epoch(value: datetime | None, what: str) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise MarketError(f"{what}: a timezone-aware datetime is needed "
                          "(e.g. datetime.now(UTC))")
    return value.timestamp()


@dataclass(frozen=True, slots=True, kw_only=True)
class Filter:
    """What a query selects: a category (and its sub-categories), a region, a member, and
    the window ends between ``since`` and ``until`` (inclusive)."""

    category: str | None = None
    region: str | None = None
    member: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def where(self, *, prefix: str = "", day_column: str | None = None, days: bool = False
              ) -> tuple[str, list[object]]:
        """An SQL condition and its arguments (columns of a table aliased ``prefix``; with
        ``days``, the table has a ``day`` column, the window end's day)."""
        clauses: list[str] = []
        args: list[object] = []
        if self.category is not None:
            # The category itself and everything under it ("grocery" holds "grocery/dairy"),
            # as a range the (category, ...) indexes can use.
            clauses.append(f"({prefix}category = ? OR ({prefix}category > ? AND "
                           f"{prefix}category < ?))")
            args += [self.category, self.category + "/", self.category + "0"]
        if self.region is not None:
            clauses.append(f"{prefix}region = ?")
            args.append(self.region)
        if self.member is not None:
            clauses.append(f"{prefix}member = ?")
            args.append(self.member)
        since, until = _epoch(self.since, "since"), _epoch(self.until, "until")
        if day_column is not None:
            if since is not None:
                clauses.append(f"{day_column} >= ?")
                args.append(int(since // DAY))
            if until is not None:
                clauses.append(f"{day_column} <= ?")
                args.append(int(until // DAY))
        else:
            # On `insights`, the day bounds too: its (day, key) index finds the rows, the
            # window end keeps the exact ones.
            if since is not None:
                clauses.append(f"{prefix}window_end >= ?")
                args.append(since)
                if days:
                    clauses.append(f"{prefix}day >= ?")
                    args.append(int(since // DAY))
            if until is not None:
                clauses.append(f"{prefix}window_end <= ?")
                args.append(until)
                if days:
                    clauses.append(f"{prefix}day <= ?")
                    args.append(int(until // DAY))
        return (" AND ".join(clauses) or "1"), args


def _market_row(r: tuple[Any, ...]) -> MarketRow:
    values: dict[str, Value] = {}
    ends = unpack(r[13])
    for metric in METRICS:  # in a fixed order, whatever the order they were received in
        if metric not in ends:
            continue
        lo, hi = ends[metric]
        if lo is not None and lo == hi:
            values[metric] = lo
        else:
            values[metric] = ValueRange.model_construct(lo=lo, hi=hi)
    return MarketRow(id=int(r[0]), member=str(r[1]), node=str(r[2]),
                     item_id=str(r[3]), category=str(r[4]), region=str(r[5]),
                     product_id=None if r[6] is None else str(r[6]),
                     window_start=_ts(r[7]), window_end=_ts(r[8]), received_at=_ts(r[9]),
                     currency=None if r[10] is None else str(r[10]),
                     direction=None if r[11] is None else str(r[11]),
                     values=values, log_ref=None if r[12] is None else str(r[12]))


def page(conn: sqlite3.Connection, flt: Filter, *, limit: int, cursor: int | None) -> Page:
    """Rows in arrival order after ``cursor`` (the ``id`` of the last row seen)."""
    if limit < 1:
        raise MarketError(f"limit must be at least 1, not {limit}")
    where, args = flt.where(days=True)
    got = conn.execute(f"SELECT {_ROW_COLUMNS} FROM insights WHERE {where} AND id > ? "
                       "ORDER BY id LIMIT ?", [*args, cursor or 0, limit + 1]).fetchall()
    more = len(got) > limit
    rows = [_market_row(r) for r in got[:limit]]
    return Page(rows=rows, next_cursor=rows[-1].id if more and rows else None)


def rows_after(conn: sqlite3.Connection, flt: Filter, cursor: int) -> Iterator[MarketRow]:
    """Every matching row after ``cursor``, fetched a page at a time."""
    while True:
        got = page(conn, flt, limit=5000, cursor=cursor)
        yield from got.rows
        if got.next_cursor is None:
            return
        cursor = got.next_cursor


def grouped(conn: sqlite3.Connection, flt: Filter, group_by: Literal["day", "week"],
            metric: str | None = None) -> list[GroupRow]:
    """Per period and metric: count, companies, mean, standard deviation and bounds, read
    from the daily roll-up (days are UTC; weeks start on Monday)."""
    if flt.member is not None:
        raise MarketError("a grouped query cannot select one member: the roll-up counts "
                          "companies, not their rows (query rows with member=… instead)")
    # Day 0 (1970-01-01) was a Thursday: day - (day + 3) % 7 is that week's Monday.
    period = "day" if group_by == "day" else "(day - (day + 3) % 7)"
    where, args = flt.where(day_column="day")
    if metric is not None:
        if metric not in METRICS:
            raise MarketError(f"unknown metric {metric!r}: one of {', '.join(METRICS)}")
        where += " AND metric = ?"
        args.append(metric)
    sums = conn.execute(
        f"SELECT {period} AS p, metric, sum(n), sum(exact), sum(s), sum(ss), min(lo), max(hi) "
        f"FROM daily WHERE {where} GROUP BY p, metric ORDER BY p, metric", args).fetchall()
    mwhere, margs = flt.where(day_column="day")
    companies = dict(conn.execute(
        f"SELECT {period} AS p, count(DISTINCT member) FROM daily_members WHERE {mwhere} "
        "GROUP BY p", margs).fetchall())
    out: list[GroupRow] = []
    for p, name, n, exact, s, ss, lo, hi in sums:
        mean = s / n if n else None
        std = None
        if n > 1 and mean is not None:
            var = (ss - n * mean * mean) / (n - 1)
            # Equal values leave only rounding behind: that is no spread.
            std = math.sqrt(var) if var > 1e-12 * max(1.0, mean * mean) else 0.0
        out.append(GroupRow(period=_ts(p * DAY), category=flt.category or "*",
                            region=flt.region, metric=name, count=n,
                            companies=companies.get(p, 0), mean=mean, stddev=std,
                            low=lo, high=hi, exact=exact == n))
    return out


def latest(conn: sqlite3.Connection, flt: Filter) -> list[MarketRow]:
    """The newest row of each sender per category, region and product."""
    where, args = flt.where(prefix="l.")  # latest holds the columns filtered on: its index
    got = conn.execute(
        f"SELECT {', '.join('i.' + c.strip() for c in _ROW_COLUMNS.split(','))} "
        f"FROM latest l JOIN insights i ON i.id = l.insight WHERE {where} "
        "ORDER BY i.category, i.region, i.member, i.node", args).fetchall()
    return [_market_row(r) for r in got]


def _cells(flt: Filter, field: str | None, what: str) -> tuple[str, list[object]]:
    """The condition on aggregate cells (or their histograms): no member, maybe a field."""
    where, args = flt.where()
    if flt.member is not None:
        raise MarketError(f"{what} have no member: they are over many companies")
    if field is not None:
        where += " AND field = ?"
        args.append(field)
    return where, args


def aggregates(conn: sqlite3.Connection, flt: Filter, *, field: str | None = None
               ) -> list[AggregateRow]:
    """Aggregate cells (newest window last)."""
    where, args = _cells(flt, field, "aggregates")
    got = conn.execute(
        "SELECT id, category, region, window_start, window_end, grp, field, currency, count, "
        f"companies, mean, stddev, received_at FROM aggregates WHERE {where} "
        "ORDER BY window_end, category, region, grp, field", args).fetchall()
    return [AggregateRow(id=r[0], category=r[1], region=r[2], window_start=_ts(r[3]),
                         window_end=_ts(r[4]), group=r[5], field=r[6], currency=r[7],
                         count=r[8], companies=r[9], mean=r[10], stddev=r[11],
                         received_at=_ts(r[12])) for r in got]


def histograms(conn: sqlite3.Connection, flt: Filter, *, field: str | None = None
               ) -> list[HistogramRow]:
    """Price bucket histograms of aggregate cells (newest window last)."""
    where, args = _cells(flt, field, "histograms")
    got = conn.execute(
        "SELECT category, region, window_start, window_end, field, currency, companies, "
        f"buckets FROM histograms WHERE {where} ORDER BY window_end, category, region, field",
        args).fetchall()
    return [HistogramRow(category=r[0], region=r[1], window_start=_ts(r[2]),
                         window_end=_ts(r[3]), field=r[4], currency=r[5], companies=r[6],
                         buckets=tuple((lo, hi, int(n)) for lo, hi, n in json.loads(r[7])))
            for r in got]
