"""The on-disk outbox: SQLite (WAL) store-and-forward for an edge node.

Every outgoing item is written here before it is sent and deleted only once acknowledged, so
nothing is lost while offline, while the broker restarts, or across a restart of this
process. Bounds, ownership and full-disk behaviour: docs/DESIGN.md (outbox).
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, NamedTuple, TypedDict, cast

from ..errors import OutboxError
from ..sqlrows import insert_rows
from .outboxfile import BUSY_TIMEOUT, SCHEMA_VERSION, is_disk_full, open_outbox, outbox_error
from .reserve import RECOVER_INTERVAL, RESERVE_BYTES, DiskReserve

__all__ = [
    "RECOVER_INTERVAL",
    "RESERVE_BYTES",
    "SCHEMA_VERSION",
    "Kind",
    "NewItem",
    "Outbox",
    "OutboxItem",
    "OutboxStats",
    "outbox_error",
]

log = logging.getLogger(__name__)

Kind = Literal["insight", "state", "contrib"]
_KINDS: Final = frozenset({"insight", "state", "contrib"})

_EXPIRE_EVERY: Final = 1.0  # s between opportunistic expiries from put_many/pending
_DELETE_CHUNK: Final = 500  # values per DELETE statement (well under SQLite's variable limit)

_COLUMNS: Final = "id, topic, payload, kind, key, retain, created, size"

_INSERT: Final = "INSERT INTO outbox (topic, payload, kind, key, retain, created, size)"


def _deleted(conn: sqlite3.Connection, column: str, values: Sequence[object]
             ) -> list[tuple[int, str]]:
    """Delete the rows whose ``column`` (an SQL expression ending in a column) is one of
    ``values``, a chunk a statement; (size, kind) of each row deleted."""
    out: list[tuple[int, str]] = []
    for start in range(0, len(values), _DELETE_CHUNK):
        chunk = values[start:start + _DELETE_CHUNK]
        marks = ",".join("?" * len(chunk))
        out += conn.execute(f"DELETE FROM outbox WHERE {column} IN ({marks})"
                            " RETURNING size, kind", chunk).fetchall()
    return out


@dataclass(frozen=True, slots=True)
class NewItem:
    """An item to store: what :meth:`Outbox.put_many` takes.

    ``key`` matters for ``kind="state"`` only: a new state row replaces the pending one with
    the same key. ``retain`` is carried for the sender (publish as a retained message).
    """

    topic: str
    payload: bytes
    kind: Kind
    key: str | None = None
    retain: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {sorted(_KINDS)}, not {self.kind!r}")
        if not isinstance(self.payload, bytes):
            raise TypeError(f"payload must be bytes, not {type(self.payload).__name__}")
        if not isinstance(self.topic, str) or not self.topic:
            raise ValueError("topic must be a non-empty string")
        if self.key is not None and not isinstance(self.key, str):
            raise TypeError(f"key must be a string or None, not {type(self.key).__name__}")


class OutboxItem(NamedTuple):
    """A stored item. ``id`` grows with insertion order and is never reused.

    A named tuple, not a frozen dataclass: one is built for every row the sender reads, and
    a tuple is built in half the time."""

    id: int
    topic: str
    payload: bytes
    kind: Kind
    key: str | None
    retain: bool
    created: float  # the outbox clock's time when stored (seconds since the epoch)
    size: int  # len(payload)


class OutboxStats(TypedDict):
    """A snapshot of an outbox's counters (:meth:`Outbox.stats`)."""

    path: str
    depth: int  # rows pending
    size_bytes: int  # payload bytes pending
    state_bytes: int  # of which in state rows (never dropped for space)
    max_bytes: int
    max_age: float
    stored: int  # items stored since open
    acked: int  # rows deleted by ack() since open
    superseded: int  # state rows replaced by a newer one with the same key since open
    dropped: dict[str, int]  # rows lost since open, by reason: "overflow", "expired"
    disk_full: bool  # new items are refused until the disk has room again


@dataclass(slots=True)
class _Tally:
    """Counters that change together with the database; replaced only after a commit."""

    depth: int
    size: int
    state_bytes: int
    stored: int = 0
    acked: int = 0
    superseded: int = 0
    overflow: int = 0
    expired: int = 0
    last_expire: float = -math.inf


class Outbox:
    """A bounded, persistent, ordered outbox in one SQLite file.

    ``clock`` gives the time stored in ``created`` and used for expiry (inject one in tests);
    ``monotonic`` times the full-disk recovery (separate, since ``clock`` may jump).
    ``busy_timeout`` is how long opening waits for another process's lock, and ``max_pages``
    caps the database at that many SQLite pages (a full database without a full disk).
    All methods are thread-safe and short; the network layer calls them from its event loop.
    Raises :class:`~pear_mqtt.errors.OutboxError` naming the file and the cause when the
    database cannot be opened (locked, read-only, not an outbox, from a newer version) or a
    write fails (disk full).
    """

    def __init__(self, *, path: Path, max_bytes: int, max_age: float,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 busy_timeout: float = BUSY_TIMEOUT, max_pages: int | None = None) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {max_bytes}")
        if not max_age > 0:
            raise ValueError(f"max_age must be positive, not {max_age}")
        self._path = Path(path)
        self._max_bytes = max_bytes
        self._max_age = float(max_age)
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        conn = open_outbox(self._path, busy_timeout=busy_timeout, max_pages=max_pages)
        try:
            # Counters live in memory; computing them here keeps them right after a restart.
            self._tally = self._load_tally(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise outbox_error(self._path, exc, "opening") from exc
        self._conn: sqlite3.Connection | None = conn
        try:
            self._reserve = DiskReserve(path=self._path, monotonic=monotonic)
        except BaseException:
            conn.close()
            self._conn = None
            raise

    @staticmethod
    def _load_tally(conn: sqlite3.Connection) -> _Tally:
        depth, size, state_bytes = conn.execute(
            "SELECT count(*), coalesce(sum(size), 0),"
            " coalesce(sum(CASE WHEN kind = 'state' THEN size ELSE 0 END), 0) FROM outbox"
        ).fetchone()
        return _Tally(depth=int(depth), size=int(size), state_bytes=int(state_bytes))

    # -- public API -----------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def depth(self) -> int:
        """Rows pending (not yet acknowledged, dropped or expired)."""
        return self._tally.depth

    def oldest(self) -> float | None:
        """When the oldest pending row was stored (the outbox clock), None when none is."""
        if self._tally.depth == 0:
            return None
        with self._lock:
            try:
                rows = self._live().execute(
                    "SELECT created FROM outbox ORDER BY id LIMIT 1").fetchall()
            except sqlite3.Error as exc:
                raise outbox_error(self._path, exc, "reading pending items") from exc
        return float(rows[0][0]) if rows else None

    @property
    def max_bytes(self) -> int:
        """The bound on payload bytes pending."""
        return self._max_bytes

    @property
    def state_bytes(self) -> int:
        """Payload bytes pending in state rows (never dropped for space)."""
        return self._tally.state_bytes

    @property
    def size_bytes(self) -> int:
        """Payload bytes pending."""
        return self._tally.size

    @property
    def superseded(self) -> int:
        """State rows replaced by a newer one with the same key since open (not a loss)."""
        return self._tally.superseded

    @property
    def dropped(self) -> dict[str, int]:
        """Rows lost since open by reason: ``overflow`` (no room) and ``expired`` (too old)."""
        t = self._tally
        return {"overflow": t.overflow, "expired": t.expired}

    def stats(self) -> OutboxStats:
        """A snapshot of the counters."""
        with self._lock:
            t = self._tally
            return OutboxStats(path=str(self._path), depth=t.depth, size_bytes=t.size,
                               state_bytes=t.state_bytes, max_bytes=self._max_bytes,
                               max_age=self._max_age, stored=t.stored, acked=t.acked,
                               superseded=t.superseded,
                               dropped={"overflow": t.overflow, "expired": t.expired},
                               disk_full=self._reserve.full)

    def put(self, *, topic: str, payload: bytes, kind: Kind, key: str | None = None,
            retain: bool = False) -> int:
        """Store one item durably; return its id. See :meth:`put_many`."""
        return self.put_many([NewItem(topic=topic, payload=payload, kind=kind, key=key,
                                      retain=retain)])[0]

    def put_many(self, items: Sequence[NewItem]) -> list[int]:
        """Store ``items`` in one transaction, in order; return their ids.

        All or nothing: on :class:`~pear_mqtt.errors.OutboxError` none of the items was
        stored and nothing already stored was lost. Raises ``OutboxError("outbox full: ...")``
        when an item does not fit even after dropping every insight/contrib row (state rows
        alone fill ``max_bytes``), and an ``OutboxError`` when the disk is full.

        Items are placed one after the other, so a large call may drop rows it stored itself
        for space; their ids are still returned and acking them is a no-op. A state item that
        a later item of the same call supersedes (same key) is never written: it counts as
        superseded and its id is 0 (no row has it, so acking it is a no-op too).
        """
        if not items:
            return []
        # A batch of insights over a few categories carries one state per insight; only the
        # newest per key survives the transaction, so the others are not written at all.
        last: dict[str, int] = {}
        for i, it in enumerate(items):
            if it.kind == "state" and it.key is not None:
                last[it.key] = i
        with self._lock:
            self._reserve.check_room(self._live())
            t = replace(self._tally)
            now = self._clock()
            with self._write(f"storing {len(items)} item(s)") as conn:
                if self._expire_due(t, now):
                    self._expire_in(conn, t, now)
                keep = [it.kind != "state" or it.key is None or last[it.key] == i
                        for i, it in enumerate(items)]
                kept = [it for it, k in zip(items, keep, strict=True) if k]
                t.superseded += len(items) - len(kept)
                t.stored += len(items) - len(kept)
                stored = iter(self._insert_all(conn, t, kept, now))
                ids = [next(stored) if k else 0 for k in keep]
            self._tally = t
            return ids

    def pending(self, *, limit: int, after_id: int = 0) -> list[OutboxItem]:
        """Up to ``limit`` rows with ``id > after_id``, in id order.

        The caller tracks what it has in flight and pages with ``after_id``.
        """
        if limit < 0:
            raise ValueError(f"limit must not be negative, not {limit}")
        with self._lock:
            conn = self._live()
            now = self._clock()
            if self._expire_due(self._tally, now) and not self._reserve.full:
                self._expire_opportunistically(now)
            try:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                    (after_id, limit)).fetchall()
            except sqlite3.Error as exc:
                raise outbox_error(self._path, exc, "reading pending items") from exc
        return [OutboxItem(r[0], r[1], r[2], cast(Kind, r[3]), r[4], bool(r[5]), r[6], r[7])
                for r in rows]

    def ack(self, ids: Iterable[int]) -> None:
        """Delete acknowledged rows in one transaction. Unknown ids are ignored."""
        wanted = sorted({int(i) for i in ids})
        if not wanted:
            return
        with self._lock:
            t = replace(self._tally)
            with self._write(f"deleting {len(wanted)} acknowledged item(s)") as conn:
                for size, kind in _deleted(conn, "id", wanted):
                    t.depth -= 1
                    t.size -= size
                    t.acked += 1
                    if kind == "state":
                        t.state_bytes -= size
            self._tally = t

    def expire(self) -> int:
        """Delete insight/contrib rows older than ``max_age``; return how many."""
        with self._lock:
            t = replace(self._tally)
            with self._write("expiring old items") as conn:
                n = self._expire_in(conn, t, self._clock())
            self._tally = t
            return n

    def close(self) -> None:
        """Close the database (idempotent). Pending rows stay for the next open."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                try:
                    conn.close()
                except sqlite3.Error as exc:
                    raise outbox_error(self._path, exc, "closing") from exc

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Outbox(path={str(self._path)!r}, depth={self._tally.depth})"

    # -- internals (called with self._lock held) ------------------------------------------

    def _live(self) -> sqlite3.Connection:
        if self._conn is None:
            raise OutboxError(f"outbox {self._path} is closed")
        return self._conn

    @contextmanager
    def _write(self, doing: str) -> Iterator[sqlite3.Connection]:
        """One write transaction; maps sqlite3 errors and handles a full disk."""
        conn = self._live()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # SQLite rolls back by itself after some errors (SQLITE_FULL among them).
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error as exc:
                        log.warning("outbox %s: rollback failed: %s", self._path, exc)
                raise
        except sqlite3.Error as exc:
            if is_disk_full(exc):
                self._reserve.release(self._conn)
            raise outbox_error(self._path, exc, doing) from exc

    def _insert_all(self, conn: sqlite3.Connection, t: _Tally, items: list[NewItem],
                    now: float) -> list[int]:
        """Store ``items`` (no two states with one key) in order; their ids.

        When they fit in ``max_bytes`` as they are, nothing has to be dropped for them, so the
        pending states they replace go first (one statement per chunk of keys) and the rows
        many to a statement. Otherwise they go one at a time, each making room for itself
        (:meth:`_make_room`) as it is placed.
        """
        sizes = [len(it.payload) for it in items]
        total = sum(sizes)
        if t.size + total > self._max_bytes:
            return [self._insert(conn, t, it, now) for it in items]
        keys = [it.key for it in items if it.kind == "state" and it.key is not None]
        for size, _ in _deleted(conn, "kind = 'state' AND key", keys):
            t.depth -= 1
            t.size -= size
            t.state_bytes -= size
            t.superseded += 1
        rows = [(it.topic, it.payload, it.kind, it.key, int(it.retain), now, size)
                for it, size in zip(items, sizes, strict=True)]
        ids = self._inserted_ids(conn, rows)
        for it, size in zip(items, sizes, strict=True):
            if it.kind == "state":
                t.state_bytes += size
        t.depth += len(items)
        t.size += total
        t.stored += len(items)
        return ids

    @staticmethod
    def _inserted_ids(conn: sqlite3.Connection, rows: Sequence[Sequence[object]]) -> list[int]:
        """Insert ``rows`` in order; their ids. AUTOINCREMENT numbers new rows one past the
        largest id ever used, so they normally are the next ``len(rows)`` numbers after the
        table's sequence: taken from the last insert's id instead of ``RETURNING`` (cheaper:
        docs/DESIGN.md), and read back from the table if they are not."""
        found = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        before = found[0] if found is not None else 0
        last = before
        for cur in insert_rows(conn, _INSERT, rows, width=7):
            last = cur.lastrowid if cur.lastrowid is not None else last
        if last - before == len(rows):
            return list(range(before + 1, last + 1))
        return [row[0] for row in conn.execute(
            "SELECT id FROM outbox WHERE id > ? ORDER BY id", (before,))]

    def _insert(self, conn: sqlite3.Connection, t: _Tally, it: NewItem, now: float) -> int:
        size = len(it.payload)
        is_state = it.kind == "state"
        if is_state and it.key is not None:
            old = conn.execute("DELETE FROM outbox WHERE kind = 'state' AND key = ?"
                               " RETURNING size", (it.key,)).fetchone()
            if old is not None:
                t.depth -= 1
                t.size -= old[0]
                t.state_bytes -= old[0]
                t.superseded += 1
        if t.size + size > self._max_bytes:
            self._make_room(conn, t, it, size)
        cur = conn.execute(f"{_INSERT} VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (it.topic, it.payload, it.kind, it.key, int(it.retain), now, size))
        t.depth += 1
        t.size += size
        if is_state:
            t.state_bytes += size
        t.stored += 1
        assert cur.lastrowid is not None
        return cur.lastrowid

    def _make_room(self, conn: sqlite3.Connection, t: _Tally, it: NewItem, size: int) -> None:
        """Drop the oldest insight/contrib rows until ``size`` more bytes fit."""
        floor = t.state_bytes + size
        if floor > self._max_bytes:
            # Decided before dropping anything: a refused item must not cost older rows.
            raise OutboxError(
                f"outbox full: {self._path} cannot take a {it.kind} item of {size} bytes for "
                f"{it.topic!r}; pending state rows hold {t.state_bytes} of max_bytes "
                f"{self._max_bytes} and are never dropped for space (the item was NOT stored)")
        need = t.size + size - self._max_bytes
        freed = count = 0
        last_id = 0
        cur = conn.execute("SELECT id, size FROM outbox WHERE kind != 'state' ORDER BY id")
        try:
            while freed < need:
                batch = cur.fetchmany(256)
                if not batch:
                    break
                for rid, rsize in batch:
                    freed += rsize
                    count += 1
                    last_id = rid
                    if freed >= need:
                        break
        finally:
            cur.close()
        # Follows from floor <= max_bytes and the tally matching the table.
        assert freed >= need, (freed, need)
        conn.execute("DELETE FROM outbox WHERE kind != 'state' AND id <= ?", (last_id,))
        t.depth -= count
        t.size -= freed
        t.overflow += count

    @staticmethod
    def _expire_due(t: _Tally, now: float) -> bool:
        # Also when the clock went backwards, so a stepped clock cannot stop expiry.
        return now - t.last_expire >= _EXPIRE_EVERY or now < t.last_expire

    def _expire_in(self, conn: sqlite3.Connection, t: _Tally, now: float) -> int:
        cutoff = now - self._max_age
        n, size = conn.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM outbox"
            " WHERE kind != 'state' AND created < ?", (cutoff,)).fetchone()
        if n:
            conn.execute("DELETE FROM outbox WHERE kind != 'state' AND created < ?", (cutoff,))
            t.depth -= n
            t.size -= size
            t.expired += n
        t.last_expire = now
        return int(n)

    def _expire_opportunistically(self, now: float) -> None:
        # Best effort: pending() is a read and must keep working when a write cannot.
        t = replace(self._tally)
        try:
            with self._write("expiring old items") as conn:
                self._expire_in(conn, t, now)
        except OutboxError as exc:
            log.warning("%s", exc)
            return
        self._tally = t
