"""Opening an outbox's SQLite file: the checks that name what is wrong with it, the
settings a store-and-forward queue on an edge node needs, its schema and version, and
SQLite's errors said plainly. The queue itself is :mod:`.outbox`."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Final

from ..errors import OutboxError

__all__ = ["BUSY_TIMEOUT", "PAGE_SIZE", "SCHEMA_VERSION", "WAL_AUTOCHECKPOINT_PAGES",
           "is_disk_full", "open_outbox", "outbox_error"]

SCHEMA_VERSION: Final = 1
"""The schema version this build writes; a file with a higher version is refused."""

PAGE_SIZE: Final = 8192
"""The page size of a new outbox file (a file keeps the size it was made with). Items are
about 1 KB, and a page holding eight of them instead of four halves the pages that a batch
of puts and later its acknowledgements write to the WAL and a checkpoint copies."""

# The WAL is checkpointed into the database file at this many pages (4 MiB at PAGE_SIZE; 2 MiB
# in a file made with 4 KiB pages). Rows are acknowledged soon after they are stored, so a
# page written and freed again between two checkpoints is copied into the database once: a
# longer interval writes less (docs/DESIGN.md, "Where the outbox's time goes"). A checkpoint
# can grow the database file by at most this much, and the WAL too, so the reserve must hold
# both for a checkpoint to finish on a full disk.
WAL_AUTOCHECKPOINT_PAGES: Final = 512
# The outbox is a queue (rows appended at the end of the id order, deleted from its start),
# so SQLite's default 2 MB page cache would hold little that is read again, while an edge
# agent's peak RSS is a budget (docs/BENCHMARKS.md, rss).
_CACHE_KIB: Final = 256

# How long an open waits for a lock held by another process. A predecessor that is exiting
# releases its lock within milliseconds; a live owner never will.
BUSY_TIMEOUT = 1.0

# SQLite primary result codes (extended codes carry these in their low byte).
_SQLITE_BUSY: Final = 5
_SQLITE_LOCKED: Final = 6
_SQLITE_READONLY: Final = 8
_SQLITE_IOERR: Final = 10
_SQLITE_CORRUPT: Final = 11
_SQLITE_FULL: Final = 13
_SQLITE_CANTOPEN: Final = 14
_SQLITE_NOTADB: Final = 26

_SCHEMA_TABLE: Final = "pear_outbox_schema"
_SCHEMA: Final = (
    f"CREATE TABLE {_SCHEMA_TABLE} (version INTEGER NOT NULL)",
    # AUTOINCREMENT: ids are never reused, not even after the table was emptied and the
    # process restarted, so a cursor over ids (the flusher's, a durable consumer's) stays valid.
    """CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('insight', 'state', 'contrib')),
        key TEXT,
        retain INTEGER NOT NULL,
        created REAL NOT NULL,
        size INTEGER NOT NULL
    )""",
    # At most one pending state row per key; coalescing relies on it.
    "CREATE UNIQUE INDEX outbox_state_key ON outbox (key) WHERE kind = 'state'",
    # Keeps expire() an index range scan; state rows never expire, so they stay out of it.
    "CREATE INDEX outbox_expiry ON outbox (created) WHERE kind != 'state'",
)


def open_outbox(path: Path, *, busy_timeout: float = BUSY_TIMEOUT,
                max_pages: int | None = None) -> sqlite3.Connection:
    """The outbox file at ``path``, opened, configured and with its schema checked (made
    when the file is new); :class:`OutboxError` saying plainly what is wrong."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutboxError(f"cannot create the directory of outbox {path}: "
                          f"{exc.strerror or exc}") from exc
    if path.exists() and not path.is_file():
        raise OutboxError(f"outbox {path} is not a regular file")
    # SQLite reports a read-only file as "disk I/O error" or "unable to open"; say it
    # plainly. access() also sees read-only mounts, for root too.
    if path.exists() and not os.access(path, os.W_OK):
        raise OutboxError(f"outbox {path} is read-only; it must be writable by this "
                          "process")
    if not path.exists() and not os.access(path.parent, os.W_OK):
        raise OutboxError(f"cannot create outbox {path}: its directory is read-only or "
                          "not writable by this process")
    try:
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT), so
        # a put_many is exactly one transaction. check_same_thread=False: self._lock
        # serialises all use.
        conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                               check_same_thread=False)
    except sqlite3.Error as exc:
        raise outbox_error(path, exc, "opening") from exc
    try:
        _configure(conn, path, max_pages)
        _check_schema(conn, path)
    except sqlite3.Error as exc:
        conn.close()
        raise outbox_error(path, exc, "opening") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _configure(conn: sqlite3.Connection, path: Path, max_pages: int | None) -> None:
    # Exclusive before the first WAL access: the WAL index then lives in this process's
    # memory (no -shm file, which a full disk could not create) and the file lock is held
    # for the connection's lifetime, so one process owns the outbox.
    conn.execute("PRAGMA locking_mode=EXCLUSIVE")
    conn.execute(f"PRAGMA page_size={PAGE_SIZE}")  # a no-op on an existing file
    # Only takes effect on a new, empty file; lets a disk-full recovery give freed pages
    # back to the file system (PRAGMA incremental_vacuum).
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    row = conn.execute("PRAGMA journal_mode=WAL").fetchone()
    if row is None or str(row[0]).lower() != "wal":
        raise OutboxError(f"outbox {path}: the file system does not support SQLite's "
                          f"WAL journal (journal_mode stayed {row[0] if row else None!r})")
    # NORMAL in WAL mode syncs at checkpoints, not at every commit: a committed
    # transaction survives a crash of this process, but the last transactions before a
    # power loss or OS crash may be rolled back (the database stays consistent).
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
    # Some builds (Debian's) default to ON, which zeroes every freed page and so writes a
    # deleted payload to the WAL again: an ack would cost as much disk as the put, and fail
    # on a full disk. FAST still zeroes deleted cells on pages that stay in use.
    conn.execute("PRAGMA secure_delete=FAST")
    conn.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
    if max_pages is not None:
        conn.execute(f"PRAGMA max_page_count={int(max_pages)}")


def _check_schema(conn: sqlite3.Connection, path: Path) -> None:
    tables = {r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
    if not tables:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _SCHEMA:
                conn.execute(stmt)
            conn.execute(f"INSERT INTO {_SCHEMA_TABLE} (version) VALUES (?)",
                         (SCHEMA_VERSION,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return
    if _SCHEMA_TABLE not in tables or "outbox" not in tables:
        shown = ", ".join(sorted(tables)[:5])
        raise OutboxError(f"{path} is not an outbox database (it is an SQLite "
                          f"database holding other tables: {shown})")
    rows = conn.execute(f"SELECT version FROM {_SCHEMA_TABLE}").fetchall()
    if len(rows) != 1 or not isinstance(rows[0][0], int):
        raise OutboxError(f"{path} is not an outbox database (its schema version "
                          f"table holds {rows!r})")
    version = rows[0][0]
    if version > SCHEMA_VERSION:
        raise OutboxError(f"outbox {path} has schema version {version}, written by a "
                          f"newer pear_mqtt; this version reads up to {SCHEMA_VERSION}")
    if version < 1:
        raise OutboxError(f"{path} is not an outbox database (schema version "
                          f"{version})")
    # Migrations from older versions go here once there is more than one version.
    # Take the write lock now, so that a second owner fails at open, not on its first put.
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("COMMIT")


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def outbox_error(path: Path, exc: sqlite3.Error, doing: str) -> OutboxError:
    """Turn a sqlite3 error met while ``doing`` something into an OutboxError naming the file
    and saying plainly what is wrong (disk full, read-only, not an outbox, corrupt, locked)."""
    code = _primary_code(exc)
    detail = str(exc)
    if code == _SQLITE_FULL or "database or disk is full" in detail:
        return OutboxError(f"outbox {path}: disk full while {doing} ({detail}); that write was "
                           "NOT stored, pending items are kept, reads and acks still work")
    if code == _SQLITE_READONLY or "readonly" in detail:
        return OutboxError(f"outbox {path} is read-only ({detail}); it must be writable by "
                           "this process")
    if code == _SQLITE_NOTADB or "file is not a database" in detail:
        return OutboxError(f"{path} is not an outbox database ({detail}); move it aside to "
                           "start a new outbox")
    if code == _SQLITE_CORRUPT or "malformed" in detail:
        return OutboxError(f"outbox {path} is corrupt ({detail}); move it aside to start a "
                           "new outbox")
    if code in (_SQLITE_BUSY, _SQLITE_LOCKED) or "locked" in detail:
        return OutboxError(f"outbox {path} is locked by another process ({detail}); only one "
                           "process may use an outbox at a time")
    if code == _SQLITE_CANTOPEN:
        return OutboxError(f"cannot open outbox {path} ({detail})")
    if code == _SQLITE_IOERR:
        return OutboxError(f"outbox {path}: I/O error while {doing} ({detail})")
    return OutboxError(f"outbox {path}: {doing} failed ({detail})")


def is_disk_full(exc: sqlite3.Error) -> bool:
    """Whether SQLite refused a write for want of space."""
    return _primary_code(exc) == _SQLITE_FULL
