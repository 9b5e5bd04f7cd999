"""Unit tests of pear_mqtt.sqlrows: rows go in whole and in order, however many there are,
and each chunk's cursor gives its RETURNING rows and rowcount; the log's checkpoint interval
is set in bytes."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from pear_mqtt.sqlrows import checkpoint_every, insert_rows

pytestmark = pytest.mark.unit


@pytest.fixture
def db() -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, a TEXT UNIQUE, b BLOB,"
                 " c REAL)")
    yield conn
    conn.close()


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 127, 128, 129, 255, 300, 1000])
def test_every_row_goes_in_in_order(db: sqlite3.Connection, n: int) -> None:
    rows = [(f"k{i}", bytes([i % 256]) * (i % 5), i / 3) for i in range(n)]
    ids = [r[0] for cur in insert_rows(db, "INSERT INTO t (a, b, c)", rows, width=3,
                                       tail=" RETURNING id")
           for r in sorted(cur.fetchall())]
    assert ids == list(range(1, n + 1))
    assert db.execute("SELECT a, b, c FROM t ORDER BY id").fetchall() == rows


def test_statements_stay_under_the_portable_parameter_limit(db: sqlite3.Connection) -> None:
    seen: list[str] = []
    db.set_trace_callback(seen.append)
    rows = [(f"k{i}", b"", 0.0) for i in range(1000)]
    assert sum(cur.rowcount for cur in insert_rows(db, "INSERT INTO t (a, b, c)", rows,
                                                   width=3)) == 1000
    seen = [s for s in seen if s.startswith("INSERT")]
    counts = [s.count("(") - 1 for s in seen]
    assert max(counts) * 3 <= 999 and sum(counts) == 1000
    assert len(set(seen)) <= 9  # full chunks plus a power-of-two tail: few texts to cache


def test_rowcount_tells_ignored_rows(db: sqlite3.Connection) -> None:
    db.execute("INSERT INTO t (a, b, c) VALUES ('k3', x'', 0)")
    rows = [(f"k{i}", b"", 0.0) for i in range(6)]
    assert sum(cur.rowcount for cur in insert_rows(db, "INSERT OR IGNORE INTO t (a, b, c)",
                                                   rows, width=3)) == 5


def test_a_caller_may_ask_for_larger_statements(db: sqlite3.Connection) -> None:
    seen: list[str] = []
    db.set_trace_callback(seen.append)
    rows = [(f"k{i}", b"", 0.0) for i in range(700)]
    for _ in insert_rows(db, "INSERT INTO t (a, b, c)", rows, width=3, most=512):
        pass
    counts = [s.count("(") - 1 for s in seen if s.startswith("INSERT")]
    assert counts == [512, 128, 32, 16, 8, 4]
    assert db.execute("SELECT count(*) FROM t").fetchone() == (700,)
    with pytest.raises(ValueError, match="power of two"):
        next(insert_rows(db, "INSERT INTO t (a, b, c)", rows, width=3, most=100))


@pytest.mark.parametrize("page", [4096, 16384])
def test_the_log_is_checkpointed_by_bytes_whatever_the_page_size(tmp_path: Path,
                                                                 page: int) -> None:
    db = sqlite3.connect(tmp_path / "f.db")
    db.execute(f"PRAGMA page_size={page}")
    db.execute("PRAGMA journal_mode=WAL")
    checkpoint_every(db, 16 * 1024 * 1024)
    assert db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 16 * 1024 * 1024 // page
    checkpoint_every(db, 100)  # less than a page: every page, not never (0 turns it off)
    assert db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1
    db.close()
