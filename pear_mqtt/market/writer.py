"""The market store's write path: received insights and aggregates become rows in one
transaction per batch, duplicates are stored once, a newer version of an item replaces the
older, and the daily roll-up the grouped queries read is kept current. Retention runs after
each batch. Layout and rationale: docs/MARKET.md."""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..history.log import Retention
from ..node.records import ReceivedAggregate, ReceivedInsight
from ..privacy.ranges import ValueRange
from .rows import METRICS

__all__ = ["DAY", "Retention", "Writer", "insight_row", "size_on_disk"]

DAY = 86_400

_COLUMNS = ("member", "node", "item_id", "category", "region", "product", "window_start",
            "window_end", "day", "received_at", "seq", "log_ref", "currency", "direction",
            *(f"{m}_{end}" for m in METRICS for end in ("lo", "hi")))
_VALUES_AT = _COLUMNS.index("currency")  # currency, direction, then the value columns
_INSERT = (f"INSERT INTO insights ({', '.join(_COLUMNS)}) VALUES "
           f"({', '.join('?' * len(_COLUMNS))}) ON CONFLICT (member, node, item_id) DO NOTHING")
_SELECT_HELD = (f"SELECT id, seq, {', '.join(_COLUMNS[_VALUES_AT:])} FROM insights "
                "WHERE member = ? AND node = ? AND item_id = ?")
_REPLACE = (f"UPDATE insights SET received_at = ?, seq = ?, log_ref = ?, "
            f"{', '.join(f'{c} = ?' for c in _COLUMNS[_VALUES_AT:])} WHERE id = ?")
_DAILY = ("INSERT INTO daily VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
          "ON CONFLICT DO UPDATE SET n = n + excluded.n, exact = exact + excluded.exact, "
          "s = s + excluded.s, ss = ss + excluded.ss, "
          "lo = min(coalesce(lo, excluded.lo), coalesce(excluded.lo, lo)), "
          "hi = max(coalesce(hi, excluded.hi), coalesce(excluded.hi, hi))")
_LATEST = ("INSERT INTO latest VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
           "insight = excluded.insight, window_end = excluded.window_end "
           "WHERE excluded.window_end >= latest.window_end")
_AGGREGATE = ("INSERT INTO aggregates (category, region, window_start, window_end, grp, field, "
              "currency, count, companies, mean, stddev, received_at) "
              "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING")
_HISTOGRAM = "INSERT OR IGNORE INTO histograms VALUES (?, ?, ?, ?, ?, ?, ?, ?)"

Row = tuple[object, ...]


def insight_row(received: ReceivedInsight) -> Row:
    """The ``insights`` row of one received insight (values as ``lo``/``hi`` pairs: an exact
    value has both ends equal, a bucket its ends, an open end NULL)."""
    shared = received.insight
    ends: dict[str, tuple[float | None, float | None]] = {}
    currency = direction = None
    for fields in shared.groups.values():
        for name, value in fields.items():
            if isinstance(value, ValueRange):
                ends[name] = (value.lo, value.hi)
            elif isinstance(value, str):
                if name == "currency":
                    currency = value
                elif name == "direction":
                    direction = value
            else:
                ends[name] = (float(value), float(value))
    size = shared.sample_size
    if isinstance(size, ValueRange):
        ends["sample_size"] = (size.lo, size.hi)
    elif size is not None:
        ends["sample_size"] = (float(size), float(size))
    values: list[float | None] = []
    for m in METRICS:
        lo, hi = ends.get(m, (None, None))
        values += (lo, hi)
    end = shared.window_end.timestamp()
    return (received.member, received.node, received.item_id, shared.category, shared.region,
            shared.product_id, shared.window_start.timestamp(), end, int(end // DAY),
            received.received_at, received.sequence, received.log_ref, currency, direction,
            *values)


def size_on_disk(path: Path) -> int:
    total = 0
    for p in (path, path.with_name(path.name + "-wal")):
        with contextlib.suppress(FileNotFoundError):
            total += p.stat().st_size
    return total


class _Cells:
    """Roll-up sums per (category, day, region, metric), accumulated in memory for a batch."""

    def __init__(self) -> None:
        self.sums: dict[tuple[str, int, str, str], list[float]] = {}
        self.members: set[tuple[str, int, str, str]] = set()

    def add(self, row: Row) -> None:
        category, region, day, member = row[3], row[4], row[8], row[0]
        assert isinstance(category, str) and isinstance(region, str) and isinstance(day, int)
        assert isinstance(member, str)
        self.members.add((category, day, region, member))
        at = _VALUES_AT + 2
        for i, metric in enumerate(METRICS):
            lo, hi = row[at + 2 * i], row[at + 2 * i + 1]
            if lo is None and hi is None:
                continue
            assert isinstance(lo, float | None) and isinstance(hi, float | None)
            mid = (lo if hi is None else hi) if lo is None or hi is None else (lo + hi) / 2
            assert mid is not None
            key = (category, day, region, metric)
            cell = self.sums.get(key)
            if cell is None:
                cell = self.sums[key] = [0, 0, 0.0, 0.0, math.inf, -math.inf]
            cell[0] += 1
            cell[1] += lo == hi
            cell[2] += mid
            cell[3] += mid * mid
            cell[4] = min(cell[4], mid if lo is None else lo)
            cell[5] = max(cell[5], mid if hi is None else hi)

    def rows(self) -> Iterable[Row]:
        for (category, day, region, metric), (n, exact, s, ss, lo, hi) in self.sums.items():
            yield (category, day, region, metric, int(n), int(exact), s, ss, lo, hi)


class Writer:
    """Writes batches into one store connection (owned by the caller's thread). Retention:
    windows that ended more than ``max_age_seconds`` ago go, and the oldest tenth at a time
    while the file and its write-ahead log exceed ``max_bytes``."""

    def __init__(self, conn: sqlite3.Connection, *, path: Path, retention: Retention) -> None:
        self._conn = conn
        self._path = path
        self._retention = retention
        self.refused = 0

    def write(self, insights: Sequence[ReceivedInsight],
              aggregates: Sequence[ReceivedAggregate], *, now: float) -> int:
        """Store a batch in one transaction; returns how many new rows it added."""
        conn = self._conn
        cells = _Cells()
        dirty: set[tuple[str, int]] = set()
        latest: dict[tuple[str, str, str, str, str], tuple[int, float]] = {}
        added = 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.cursor()
            for received in insights:
                try:
                    row = insight_row(received)
                except (TypeError, ValueError, OverflowError):
                    self.refused += 1
                    continue
                cur.execute(_INSERT, row)
                if cur.rowcount == 1:
                    rowid = cur.lastrowid
                    assert rowid is not None
                    added += 1
                    cells.add(row)
                elif (rowid := self._replace(cur, row)) is not None:
                    dirty.add((str(row[3]), int(row[8])))  # type: ignore[call-overload]
                else:
                    continue
                key = (str(row[3]), str(row[4]), str(row[0]), str(row[1]), str(row[5] or ""))
                end = float(row[7])  # type: ignore[arg-type]
                if key not in latest or latest[key][1] <= end:
                    latest[key] = (rowid, end)
            for received_aggregate in aggregates:
                added += self._aggregate(cur, received_aggregate)
            cur.executemany(_DAILY, cells.rows())
            cur.executemany("INSERT OR IGNORE INTO daily_members VALUES (?, ?, ?, ?)",
                            cells.members)
            for category, day in dirty:
                self._recompute(cur, category, day)
            cur.executemany(_LATEST, [(*k[2:4], *k[:2], k[4], rowid, end)
                                      for k, (rowid, end) in latest.items()])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._enforce(now)
        return added

    def _replace(self, cur: sqlite3.Cursor, row: Row) -> int | None:
        """A newer version of a held item replaces it (the id stays); None when the held one
        is the same or newer."""
        held = cur.execute(_SELECT_HELD, row[:3]).fetchone()
        if held is None:
            return None
        rowid, seq = held[0], held[1]
        new_seq = row[10]
        assert isinstance(new_seq, int)
        if new_seq <= seq or tuple(held[2:]) == row[_VALUES_AT:]:
            return None
        cur.execute(_REPLACE, (row[9], new_seq, row[11], *row[_VALUES_AT:], rowid))
        return int(rowid)

    def _recompute(self, cur: sqlite3.Cursor, category: str, day: int) -> None:
        """Rebuild one (category, day) roll-up cell from its rows (after a replacement)."""
        cells = _Cells()
        for row in cur.execute(f"SELECT {', '.join(_COLUMNS)} FROM insights "
                               "WHERE category = ? AND day = ?", (category, day)).fetchall():
            cells.add(tuple(row))
        cur.execute("DELETE FROM daily WHERE category = ? AND day = ?", (category, day))
        cur.executemany(_DAILY, cells.rows())

    def _aggregate(self, cur: sqlite3.Cursor, received: ReceivedAggregate) -> int:
        body = received.aggregate
        start, end = body.window_start.timestamp(), body.window_end.timestamp()
        added = 0
        for cell in body.cells:
            for group in cell.groups:
                for field, stat in group.fields.items():
                    cur.execute(_AGGREGATE, (body.category, cell.region, start, end,
                                             group.group, field, group.currency, stat.count,
                                             stat.companies, stat.mean, stat.stddev,
                                             received.received_at))
                    added += cur.rowcount
            for hist in cell.histograms or ():
                cur.execute(_HISTOGRAM, (body.category, cell.region, start, end, hist.field,
                                         hist.currency, hist.companies, json.dumps(
                                             [[b.lo, b.hi, b.companies] for b in hist.buckets])))
        return added

    # -- retention ---------------------------------------------------------------------------
    def _enforce(self, now: float) -> None:
        ret = self._retention
        if ret.max_age_seconds is not None:
            cutoff = now - ret.max_age_seconds
            if self._conn.execute("SELECT 1 FROM insights WHERE window_end < ? LIMIT 1",
                                  (cutoff,)).fetchone() or self._conn.execute(
                    "SELECT 1 FROM aggregates WHERE window_end < ? LIMIT 1",
                    (cutoff,)).fetchone():
                self.drop_before(cutoff)
        if ret.max_bytes is not None and size_on_disk(self._path) > ret.max_bytes:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            # Drop the oldest tenth at a time until 80 % of the cap is left for new rows.
            while size_on_disk(self._path) > ret.max_bytes * 0.8:
                if not self._drop_oldest_tenth():
                    break

    def _drop_oldest_tenth(self) -> bool:
        conn = self._conn
        n = conn.execute("SELECT count(*) FROM insights").fetchone()[0]
        if n:
            # Ordered by window end, then arrival: a stream of one window still loses its
            # oldest rows only.
            end, rowid = conn.execute("SELECT window_end, id FROM insights ORDER BY "
                                      "window_end, id LIMIT 1 OFFSET ?",
                                      (max(1, n // 10) - 1,)).fetchone()
            self.drop_before(float(end), last_id=int(rowid))
            return True
        n = conn.execute("SELECT count(*) FROM aggregates").fetchone()[0]
        if n == 0:
            return False
        end = conn.execute("SELECT window_end FROM aggregates ORDER BY window_end "
                           "LIMIT 1 OFFSET ?", (max(1, n // 10) - 1,)).fetchone()[0]
        self.drop_before(float(end), last_id=-1)
        return True

    def drop_before(self, cutoff: float, *, last_id: int | None = None) -> None:
        """Delete every row whose window ends before ``cutoff`` (and, with ``last_id``, the
        rows ending at it up to that id; -1: all aggregates ending at it) and the roll-up
        days it leaves behind, then give the space back to the file system."""
        conn = self._conn
        day = int(cutoff // DAY)
        args: tuple[float | int, ...]
        if last_id is None:
            older, args = "window_end < ?", (cutoff,)
            cells = "window_end < ?"
        else:
            older = "(window_end < ? OR (window_end = ? AND id <= ?))"
            args = (cutoff, cutoff, last_id)
            cells = "window_end <= ?"
        conn.execute("BEGIN IMMEDIATE")
        try:
            edge = [r[0] for r in conn.execute(
                f"SELECT DISTINCT category FROM insights WHERE day = ? AND {older}",
                (day, *args))]
            conn.execute(f"DELETE FROM insights WHERE {older}", args)
            conn.execute(f"DELETE FROM latest WHERE {older.replace('id <=', 'insight <=')}",
                         args)
            conn.execute(f"DELETE FROM aggregates WHERE {cells}", (cutoff,))
            conn.execute(f"DELETE FROM histograms WHERE {cells}", (cutoff,))
            conn.execute("DELETE FROM daily WHERE day < ?", (day,))
            conn.execute("DELETE FROM daily_members WHERE day < ?", (day,))
            cur = conn.cursor()
            for category in edge:
                self._recompute(cur, category, day)
                cur.execute("DELETE FROM daily_members WHERE category = ? AND day = ? AND "
                            "member NOT IN (SELECT member FROM insights WHERE category = ? "
                            "AND day = ?)", (category, day, category, day))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("PRAGMA incremental_vacuum")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
