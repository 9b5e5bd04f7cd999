"""The market store's SQLite schema: opening a file, creating or checking its tables, and
binding it to one network (a store never mixes networks). Rationale: docs/MARKET.md."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from ..errors import MarketError
from ..sqlrows import checkpoint_every
from .values import from_packed

__all__ = ["CHECKPOINT_BYTES", "PAGE_SIZE", "SCHEMA_VERSION", "connect", "ensure"]

PAGE_SIZE = 16384
"""The page size of a new store (a store keeps the size it was made with). Items arrive in
no order of the roll-up's, the latest rows' and the item index's keys, so a batch dirties
pages all over those trees: with 16 KiB pages there are a quarter as many to write at each
commit and copy at each checkpoint (docs/MARKET.md, "The write path and its cost")."""

CHECKPOINT_BYTES = 40 * 1024 * 1024
"""Write-ahead log written between two checkpoints, whatever the store's page size."""

SCHEMA_VERSION = "2"
"""2: figures as JSON (market/values.py); a store of schema 1 (packed figures) is upgraded
the first time it is opened for writing."""

_DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS insights (
    id INTEGER PRIMARY KEY,
    key INTEGER NOT NULL,  -- 64-bit hash of (member, node, item id): the item's index key
    member TEXT NOT NULL, node TEXT NOT NULL, item_id TEXT NOT NULL,
    category TEXT NOT NULL, region TEXT NOT NULL, product TEXT,
    window_start REAL NOT NULL, window_end REAL NOT NULL, day INTEGER NOT NULL,
    received_at REAL NOT NULL, seq INTEGER NOT NULL, log_ref TEXT,
    currency TEXT, direction TEXT,
    vals TEXT NOT NULL);  -- the disclosed figures, as JSON (market/values.py)
-- An item's day is part of what it describes, so a lookup knows it; new items land near
-- each other in this index (recent days) instead of at random places in the whole of it.
-- It also serves a roll-up day's rebuild, and time bounds (retention, pages, the oldest
-- row) through the day: no (category, day) or window-end index, which cost a third and a
-- tenth of the insert time and which the queries do not need.
CREATE INDEX IF NOT EXISTS insights_day_key ON insights (day, key);
CREATE TABLE IF NOT EXISTS latest (
    member TEXT NOT NULL, node TEXT NOT NULL, category TEXT NOT NULL, region TEXT NOT NULL,
    product TEXT NOT NULL, insight INTEGER NOT NULL, window_end REAL NOT NULL,
    PRIMARY KEY (category, region, member, node, product)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS daily (
    category TEXT NOT NULL, day INTEGER NOT NULL, region TEXT NOT NULL, metric TEXT NOT NULL,
    n INTEGER NOT NULL, exact INTEGER NOT NULL, s REAL NOT NULL, ss REAL NOT NULL,
    lo REAL, hi REAL,
    PRIMARY KEY (category, day, region, metric)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS daily_members (
    category TEXT NOT NULL, day INTEGER NOT NULL, region TEXT NOT NULL, member TEXT NOT NULL,
    PRIMARY KEY (category, day, region, member)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS aggregates (
    id INTEGER PRIMARY KEY,
    category TEXT NOT NULL, region TEXT NOT NULL,
    window_start REAL NOT NULL, window_end REAL NOT NULL,
    grp TEXT NOT NULL, field TEXT NOT NULL, currency TEXT,
    count INTEGER NOT NULL, companies INTEGER NOT NULL, mean REAL NOT NULL, stddev REAL,
    received_at REAL NOT NULL,
    UNIQUE (category, region, window_start, window_end, grp, field));
CREATE INDEX IF NOT EXISTS aggregates_window_end ON aggregates (window_end);
CREATE TABLE IF NOT EXISTS histograms (
    category TEXT NOT NULL, region TEXT NOT NULL,
    window_start REAL NOT NULL, window_end REAL NOT NULL, field TEXT NOT NULL,
    currency TEXT, companies INTEGER NOT NULL, buckets TEXT NOT NULL,
    PRIMARY KEY (category, region, window_start, window_end, field)) WITHOUT ROWID;
"""


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection to the store at ``path`` (WAL: readers never wait for the writer)."""
    try:
        if readonly:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False,
                                   timeout=30.0)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, check_same_thread=False, timeout=30.0,
                                   isolation_level=None)
            # Both take effect on a new, empty file only, and the page size only before the
            # vacuum mode.
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            # A checkpoint every ~40 MB of log, not SQLite's ~4 MB: a page a batch touched
            # again since is copied and synced once, and the commits that wait for a
            # checkpoint's syncs are a tenth as many. The log is cut back to 8 MB after.
            checkpoint_every(conn, CHECKPOINT_BYTES)
            conn.execute("PRAGMA journal_size_limit = 8388608")
            # The item index takes keys in random order: keep its pages in memory.
            conn.execute("PRAGMA cache_size = -65536")
        conn.execute("PRAGMA foreign_keys = OFF")
        return conn
    except sqlite3.Error as exc:
        raise MarketError(f"market store {path}: cannot open it ({exc}); check the path "
                          "and its permissions") from exc


def ensure(conn: sqlite3.Connection, path: Path, *, network: str | None, mode: str | None
           ) -> tuple[str, str]:
    """Create the tables (first use) and bind the store to ``network`` and ``mode``; returns
    the network and mode the store holds. Refuses a store of another network or mode."""
    try:
        conn.executescript(_DDL)
        # The indexes older versions made; a read-only reader leaves them to the writer.
        with contextlib.suppress(sqlite3.OperationalError):
            conn.execute("DROP INDEX IF EXISTS insights_category_day")
            conn.execute("DROP INDEX IF EXISTS insights_window_end")
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError as exc:
        raise MarketError(f"market store {path}: not a readable store ({exc}); move it "
                          "away to start a new one") from exc
    if meta.get("schema") == "1":
        _upgrade_from_1(conn, path)
        meta["schema"] = SCHEMA_VERSION
    if meta.get("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise MarketError(f"market store {path}: schema {meta['schema']} is not the "
                          f"{SCHEMA_VERSION} this version reads; export it with the version "
                          "that wrote it, or move it away")
    held = (meta.get("network"), meta.get("mode"))
    if held[0] is None:
        if network is None or mode is None:
            raise MarketError(f"market store {path}: empty (no network has written to it); "
                              "check the path")
        conn.executemany("INSERT INTO meta VALUES (?, ?)",
                         [("schema", SCHEMA_VERSION), ("network", network), ("mode", mode)])
        return network, mode
    if network is not None and (network, mode) != held:
        raise MarketError(f"market store {path} holds {held[1]} network {held[0]!r}, not "
                          f"{mode} network {network!r}: one store per network (set "
                          "market.path to another file)")
    return str(held[0]), str(held[1])


def _upgrade_from_1(conn: sqlite3.Connection, path: Path) -> None:
    """Rewrite a schema 1 store's packed figures as JSON, in one transaction (the roll-up
    it holds stays valid: only the form of the figures changes)."""
    conn.create_function("pear_figures_from_packed", 1, from_packed, deterministic=True)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("UPDATE insights SET vals = pear_figures_from_packed(vals)")
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (SCHEMA_VERSION,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        if "readonly" in str(exc):
            raise MarketError(f"market store {path}: written by an older pear_mqtt (schema "
                              "1); open it once for writing (start the node that keeps it) "
                              "to upgrade it, then read it again") from exc
        raise MarketError(f"market store {path}: cannot upgrade it from schema 1 ({exc}); "
                          "check the free space and permissions there, or move it away to "
                          "start a new one") from exc
