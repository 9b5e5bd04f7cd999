"""The market store's write path: received insights and aggregates become rows in one
transaction per batch, duplicates are stored once, a newer version of an item replaces the
older, and the daily roll-up the grouped queries read is kept current. Retention runs after
each batch. Layout and rationale: docs/MARKET.md."""

from __future__ import annotations

import contextlib
import hashlib
import json
import operator
import sqlite3
import struct
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ..errors import MarketError
from ..history.log import Retention
from ..node.records import ReceivedAggregate, ReceivedInsight
from ..privacy.ranges import ValueRange
from ..sqlrows import insert_rows
from .values import pack

__all__ = ["DAY", "Retention", "Row", "Writer", "insight_row", "item_key", "size_on_disk"]

DAY = 86_400

_COLUMNS = ("member", "node", "item_id", "category", "region", "product", "window_start",
            "window_end", "day", "received_at", "seq", "log_ref", "currency", "direction",
            "vals")
# A row as insight_row() makes it: the key, then the columns. Its values: currency,
# direction, then the figures (market/values.py).
_VALUES_AT = 1 + _COLUMNS.index("currency")
_VALUE_COLUMNS = _COLUMNS[_VALUES_AT - 1:]
_INSERT = f"INSERT INTO insights (key, {', '.join(_COLUMNS)})"
# Rows per INSERT (sqlrows): executemany takes the interpreter back after each row's step,
# and each time waits for the receiving thread to let go of it (docs/MARKET.md).
_MANY = 256
# Joined to the keys as a table of constants, so each key is one search of its index. An
# integer key indexes in a third of the space of the three strings, and inserts as fast.
_SELECT_HELD = ("SELECT i.member, i.node, i.item_id, i.id, i.seq, "
                f"{', '.join('i.' + c for c in _VALUE_COLUMNS)} FROM (VALUES {{}}) k "
                "JOIN insights i ON i.day = k.column1 AND i.key = k.column2")
_LOOKUP = 500  # keys per lookup query
_REPLACE = (f"UPDATE insights SET received_at = ?, seq = ?, log_ref = ?, "
            f"{', '.join(f'{c} = ?' for c in _VALUE_COLUMNS)} WHERE id = ?")


# The roll-up of what {source} and {where} select, summed by SQLite from the figures (the
# JSON of market/values.py), each weighing {n}: an exact figure counts as exact at its
# value, a bucket at its middle, an open bucket at its one end (not exact); a cell held
# already is added to. The figures' ends are read once into a table of their own
# (MATERIALIZED): merged into the sums, each mention of an end would parse its JSON again.
_ROLLUP = """WITH figures AS MATERIALIZED (
    SELECT i.category, i.day, i.region, {n} AS n, j.key AS metric,
           CASE WHEN j.type = 'array' THEN j.value ->> 0 ELSE j.value END AS lo,
           CASE WHEN j.type = 'array' THEN j.value ->> 1 ELSE j.value END AS hi
    FROM {source} i, json_each(i.vals) j WHERE {where})
INSERT INTO daily
SELECT category, day, region, metric, sum(n), sum(n * exact), sum(n * mid),
       sum(n * (mid * mid)), min(lo), max(hi)
FROM (SELECT category, day, region, metric, n, lo IS hi AS exact,
             coalesce(lo, hi) AS lo, coalesce(hi, lo) AS hi,
             CASE WHEN lo IS NULL OR hi IS NULL THEN coalesce(lo, hi)
                  ELSE (lo + hi) / 2 END AS mid
      FROM figures)
WHERE lo IS NOT NULL
GROUP BY category, day, region, metric
ON CONFLICT DO UPDATE SET n = n + excluded.n, exact = exact + excluded.exact,
    s = s + excluded.s, ss = ss + excluded.ss,
    lo = min(lo, excluded.lo), hi = max(hi, excluded.hi)"""
# A batch's rows counted per (category, day, region, figures): a batch holds far fewer
# distinct figures than rows when they are buckets or repeated prices.
_CELLS_TABLE = ("CREATE TEMP TABLE IF NOT EXISTS pear_cells (category TEXT, day INTEGER, "
                "region TEXT, vals TEXT, n INTEGER)")
_ROLLUP_CELLS = _ROLLUP.format(n="i.n", source="temp.pear_cells", where="1")
_ROLLUP_BATCH = _ROLLUP.format(n="1", source="insights", where="i.id BETWEEN ? AND ?")
_ROLLUP_CELL = _ROLLUP.format(n="1", source="insights", where="i.category = ? AND i.day = ?")
_MEMBERS = ("INSERT OR IGNORE INTO daily_members SELECT DISTINCT category, day, region, member "
            "FROM insights WHERE {where}")
_MEMBERS_BATCH = _MEMBERS.format(where="id BETWEEN ? AND ?")
_MEMBERS_CELL = _MEMBERS.format(where="category = ? AND day = ?")
# Each sender's newest row per category, region and product, from the rows a batch added
# (ids ?1..?2), in SQLite alone: a later window, or the later of equal ones, replaces. Taken
# in id order (the table's own, so nothing is sorted), each row replaces the one held if its
# window ends no earlier: what is left is the latest window, and of equal ones the last id.
_LATEST = ("INSERT INTO latest SELECT member, node, category, region, coalesce(product, ''), "
           "id, window_end FROM insights WHERE id BETWEEN ? AND ? ORDER BY id "
           "ON CONFLICT DO UPDATE SET insight = excluded.insight, "
           "window_end = excluded.window_end WHERE excluded.window_end >= latest.window_end")
_AGGREGATE = ("INSERT INTO aggregates (category, region, window_start, window_end, grp, field, "
              "currency, count, companies, mean, stddev, received_at) "
              "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING")
_HISTOGRAM = "INSERT OR IGNORE INTO histograms VALUES (?, ?, ?, ?, ?, ?, ?, ?)"

Row = tuple[object, ...]


def item_key(member: str, node: str, item_id: str) -> int:
    """The index key of (member, node, item id): a signed 64-bit BLAKE2b of the three,
    NUL-separated."""
    sender = _senders.get((member, node))
    if sender is None:
        if len(_senders) >= _CACHE_MAX:
            _senders.clear()
        # BLAKE2b hashes a stream: a sender's prefix is hashed once, then copied per item.
        sender = _senders[(member, node)] = hashlib.blake2b(
            f"{member}\x00{node}\x00".encode(), digest_size=8)
    h = sender.copy()
    h.update(item_id.encode())
    return _signed64(h.digest())[0]  # type: ignore[no-any-return]


_CACHE_MAX = 4096
_senders: dict[tuple[str, str], hashlib.blake2b] = {}
_signed64 = struct.Struct(">q").unpack


def insight_row(received: ReceivedInsight) -> Row:
    """The ``insights`` row of one received insight: its index key (:func:`item_key`), then
    the ``_COLUMNS`` (the figures in ``vals``)."""
    shared = received.insight
    figures: list[tuple[str, float | None, float | None]] = []
    currency = direction = None
    for fields in shared.groups.values():
        for name, value in fields.items():
            # The validated model's exact classes first: isinstance() against a pydantic
            # model class is several times slower when it fails.
            cls = value.__class__
            if cls is ValueRange:
                figures.append((name, value.lo, value.hi))  # type: ignore[union-attr]
            elif cls is str:
                if name == "currency":
                    currency = value
                elif name == "direction":
                    direction = value
            elif cls is float:
                figures.append((name, value, value))  # type: ignore[arg-type]
            elif isinstance(value, ValueRange):
                figures.append((name, value.lo, value.hi))
            elif isinstance(value, str):
                if name == "currency":
                    currency = value
                elif name == "direction":
                    direction = value
            else:
                figures.append((name, float(value), float(value)))
    size = shared.sample_size
    if size is not None:
        if isinstance(size, ValueRange):
            figures.append(("sample_size", size.lo, size.hi))
        else:
            figures.append(("sample_size", float(size), float(size)))
    # Buckets and repeated prices make a batch hold far fewer distinct figures than rows.
    held = tuple(figures)
    vals = _packed.get(held)
    if vals is None:
        vals = pack(figures)
        if len(_packed) >= _CACHE_MAX:
            _packed.clear()
        _packed[held] = vals
    end = shared.window_end.timestamp()
    member, node, item_id = received.member, received.node, received.item_id
    return (item_key(member, node, item_id), member, node, item_id, shared.category,
            shared.region, shared.product_id, shared.window_start.timestamp(), end,
            int(end // DAY), received.received_at, received.sequence, received.log_ref,
            currency, direction, vals)


_packed: dict[tuple[tuple[str, float | None, float | None], ...], str] = {}


def size_on_disk(path: Path) -> int:
    total = 0
    for p in (path, path.with_name(path.name + "-wal")):
        with contextlib.suppress(FileNotFoundError):
            total += p.stat().st_size
    return total


# Of a row as insight_row() makes it: its key; its roll-up cell and figures.
_KEY = operator.itemgetter(0)
_FIGURES = operator.itemgetter(4, 9, 5, 15)


class Writer:
    """Writes batches into one store connection (owned by the caller's thread). Retention:
    windows that ended more than ``max_age_seconds`` ago go, and the oldest tenth at a time
    while the file and its write-ahead log exceed ``max_bytes``."""

    def __init__(self, conn: sqlite3.Connection, *, path: Path, retention: Retention) -> None:
        self._conn = conn
        self._path = path
        self._retention = retention
        self.refused = 0
        conn.execute(_CELLS_TABLE)  # per connection: made once, emptied per batch

    def rows(self, insights: Sequence[ReceivedInsight]) -> list[Row]:
        """The rows of ``insights`` (:func:`insight_row`); those that make none are counted
        as refused."""
        rows: list[Row] = []
        for received in insights:
            row = self.row(received)
            if row is not None:
                rows.append(row)
        return rows

    def row(self, received: ReceivedInsight) -> Row | None:
        """The row of one insight (:func:`insight_row`); None, counted as refused, if it
        makes none."""
        try:
            return insight_row(received)
        except (TypeError, ValueError, OverflowError, struct.error):
            self.refused += 1
            return None

    def write_rows(self, rows: list[Row], aggregates: Sequence[ReceivedAggregate], *,
                   now: float) -> int:
        """Store rows made by :meth:`rows` and aggregates in one transaction; returns how
        many new rows it added."""
        batch = rows
        if len(set(map(_KEY, rows))) < len(rows):
            # An item more than once (or two keys alike): its newest version wins.
            newest: dict[tuple[object, ...], Row] = {}
            for row in rows:
                key = row[1:4]
                other = newest.get(key)
                if other is None or other[11] < row[11]:  # type: ignore[operator]
                    newest[key] = row
            batch = list(newest.values())
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            added = self._insights(conn.cursor(), batch)
            cur = conn.cursor()
            for received_aggregate in aggregates:
                added += self._aggregate(cur, received_aggregate)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._enforce(now)
        return added

    def _insights(self, cur: sqlite3.Cursor, batch: list[Row]) -> int:
        """New items (``batch`` holds each once) go in with one statement; held ones (looked
        up a few hundred keys per query) are replaced only by a newer version with other
        values."""
        held = self._held(cur, batch)
        dirty: set[tuple[str, int]] = set()
        new: list[Row]
        if held:
            new = []
            for row in batch:
                old = held.get(row[1:4])
                if old is None:
                    new.append(row)
                    continue
                rowid, seq, values = old
                if row[11] <= seq or values == row[_VALUES_AT:]:  # type: ignore[operator]
                    continue
                cur.execute(_REPLACE, (row[10], row[11], row[12], *row[_VALUES_AT:], rowid))
                dirty.add((str(row[4]), int(row[9])))  # type: ignore[call-overload]
        else:
            new = batch
        if new:
            # New rows take the ids after the largest (SQLite's rowid rule), in this order.
            first = int(cur.execute("SELECT coalesce(max(id), 0) + 1 FROM insights")
                        .fetchall()[0][0])
            for _ in insert_rows(cur, _INSERT, new, width=len(_COLUMNS) + 1, most=_MANY):
                pass
            last = cur.execute("SELECT max(id) FROM insights").fetchall()[0][0]
            if last != first + len(new) - 1:
                # Only once the largest id is 2**63 - 1 does SQLite pick ids elsewhere.
                raise MarketError(f"market store: its row ids are used up (new rows took ids "
                                  f"up to {last}, not {first}..{first + len(new) - 1}); "
                                  "export it and start a new store")
            self._roll_up_batch(cur, new, (first, last))
            cur.execute(_LATEST, (first, last))
        for category, day in dirty:
            self._recompute(cur, category, day)
        return len(new)

    def _held(self, cur: sqlite3.Cursor, rows: list[Row]
              ) -> dict[tuple[object, ...], tuple[int, int, tuple[object, ...]]]:
        """(id, seq, values) of the items already stored, of these rows."""
        out: dict[tuple[object, ...], tuple[int, int, tuple[object, ...]]] = {}
        for at in range(0, len(rows), _LOOKUP):
            chunk = rows[at:at + _LOOKUP]
            sql = _SELECT_HELD.format(", ".join(["(?, ?)"] * len(chunk)))
            for r in cur.execute(sql, [v for row in chunk for v in (row[9], row[0])]):
                out[tuple(r[:3])] = (r[3], r[4], tuple(r[5:]))  # a hash collision: no match
        return out

    @staticmethod
    def _roll_up_batch(cur: sqlite3.Cursor, new: list[Row], ids: tuple[int, int]) -> None:
        """Add the new rows (ids ``ids``) to the roll-up tables: counted per distinct
        figures first when that makes them fewer than half, else row by row."""
        counts = Counter(map(_FIGURES, new))
        if len(counts) * 2 <= len(new):
            cur.execute("DELETE FROM temp.pear_cells")
            cur.executemany("INSERT INTO temp.pear_cells VALUES (?, ?, ?, ?, ?)",
                            [(*cell, n) for cell, n in counts.items()])
            cur.execute(_ROLLUP_CELLS)
        else:
            cur.execute(_ROLLUP_BATCH, ids)
        cur.execute(_MEMBERS_BATCH, ids)

    def _recompute(self, cur: sqlite3.Cursor, category: str, day: int) -> None:
        """Rebuild one (category, day) roll-up cell from its rows (after a replacement or
        retention)."""
        cur.execute("DELETE FROM daily WHERE category = ? AND day = ?", (category, day))
        cur.execute("DELETE FROM daily_members WHERE category = ? AND day = ?", (category, day))
        cur.execute(_ROLLUP_CELL, (category, day))
        cur.execute(_MEMBERS_CELL, (category, day))

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
            if self._conn.execute("SELECT 1 FROM insights WHERE day <= ? AND window_end < ? "
                                  "LIMIT 1", (int(cutoff // DAY), cutoff)).fetchall() or \
                    self._conn.execute(
                    "SELECT 1 FROM aggregates WHERE window_end < ? LIMIT 1",
                    (cutoff,)).fetchall():
                self.drop_before(cutoff)
        if ret.max_bytes is not None and size_on_disk(self._path) > ret.max_bytes:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            # Drop the oldest tenth at a time until 80 % of the cap is left for new rows, but
            # keep at least 40 % in use: a reader holding a snapshot keeps the write-ahead log
            # from being truncated, and deleting rows cannot shrink that.
            while (size_on_disk(self._path) > ret.max_bytes * 0.8
                   and self._used_bytes() > ret.max_bytes * 0.4):
                if not self._drop_oldest_tenth():
                    break

    def _used_bytes(self) -> int:
        page = self._conn.execute("PRAGMA page_size").fetchone()[0]
        pages = self._conn.execute("PRAGMA page_count").fetchone()[0]
        free = self._conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int(page) * (int(pages) - int(free))

    def _drop_oldest_tenth(self) -> bool:
        conn = self._conn
        # fetchall: a statement left after its first row would hold a read snapshot open.
        days = conn.execute("SELECT day, count(*) FROM insights GROUP BY day "
                            "ORDER BY day").fetchall()
        n = sum(count for _, count in days)
        if n:
            # Ordered by window end, then arrival: a stream of one window still loses its
            # oldest rows only. The day of the tenth's last row first (from the index), then
            # that row among the day's.
            left, at = max(1, n // 10), 0
            while left > days[at][1]:
                left -= days[at][1]
                at += 1
            end, rowid = conn.execute("SELECT window_end, id FROM insights WHERE day = ? "
                                      "ORDER BY window_end, id LIMIT 1 OFFSET ?",
                                      (days[at][0], left - 1)).fetchall()[0]
            self.drop_before(float(end), last_id=int(rowid))
            return True
        n = conn.execute("SELECT count(*) FROM aggregates").fetchall()[0][0]
        if n == 0:
            return False
        end = conn.execute("SELECT window_end FROM aggregates ORDER BY window_end "
                           "LIMIT 1 OFFSET ?", (max(1, n // 10) - 1,)).fetchall()[0][0]
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
        # Rows of days up to the cutoff's, found by the (day, key) index.
        rows = f"day <= {day} AND {older}"
        conn.execute("BEGIN IMMEDIATE")
        try:
            edge = [r[0] for r in conn.execute(
                f"SELECT DISTINCT category FROM insights WHERE day = ? AND {older}",
                (day, *args))]
            conn.execute(f"DELETE FROM insights WHERE {rows}", args)
            conn.execute(f"DELETE FROM latest WHERE {older.replace('id <=', 'insight <=')}",
                         args)
            conn.execute(f"DELETE FROM aggregates WHERE {cells}", (cutoff,))
            conn.execute(f"DELETE FROM histograms WHERE {cells}", (cutoff,))
            conn.execute("DELETE FROM daily WHERE day < ?", (day,))
            conn.execute("DELETE FROM daily_members WHERE day < ?", (day,))
            cur = conn.cursor()
            for category in edge:
                self._recompute(cur, category, day)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        # executescript steps the pragma to its end: execute() frees one page per step.
        conn.executescript("PRAGMA incremental_vacuum;")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
