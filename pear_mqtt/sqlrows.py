"""SQLite helpers the stores share: rows written many to one SQL statement (``INSERT …
VALUES (…), (…), …``), and a write-ahead log checkpointed by bytes, not pages.

``executemany`` steps SQLite's statement once per row, giving the interpreter up and taking
it back around each step; one statement per chunk of rows pays that once per chunk. Chunks
are powers of two, so a handful of statement texts serve every batch size from the
connection's statement cache (docs/DESIGN.md, "Where the outbox's time goes").
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Iterator, Sequence

__all__ = ["checkpoint_every", "insert_rows"]

# SQLite's default limit on a statement's parameters before 3.32 (later builds allow 32766).
_MAX_PARAMETERS = 999


@functools.lru_cache(maxsize=64)
def _statement(head: str, width: int, n: int, tail: str) -> str:
    row = "(" + ", ".join("?" * width) + ")"
    return f"{head} VALUES {', '.join([row] * n)}{tail}"


def _chunks(n: int, most: int) -> Iterator[int]:
    """Rows per statement for ``n`` rows: full chunks of ``most`` (a power of two), then the
    rest's binary digits."""
    while n >= most:
        yield most
        n -= most
    part = most
    while n:
        part //= 2
        if n >= part:
            yield part
            n -= part


def insert_rows(db: sqlite3.Connection | sqlite3.Cursor, head: str,
                rows: Sequence[Sequence[object]], *, width: int, tail: str = "",
                most: int | None = None) -> Iterator[sqlite3.Cursor]:
    """Run ``head VALUES (…), (…)… tail`` over ``rows`` (``width`` values each, in order), a
    chunk at a time; yields each chunk's cursor, to be read (its ``RETURNING`` rows, its
    ``rowcount``) before the next chunk runs.

    ``most`` rows go to a statement at most: a power of two, by default the largest whose
    parameters stay within 999 (SQLite before 3.32); a caller that needs fewer statements
    may ask for more on a newer SQLite (up to 32,766 parameters)."""
    if most is None:
        most = 1 << ((_MAX_PARAMETERS // width).bit_length() - 1)
    elif most < 1 or most & (most - 1):
        raise ValueError(f"most must be a power of two, not {most}")
    at = 0
    for n in _chunks(len(rows), most):
        yield db.execute(_statement(head, width, n, tail),
                         [v for row in rows[at:at + n] for v in row])
        at += n


def checkpoint_every(db: sqlite3.Connection, nbytes: int) -> None:
    """Checkpoint ``db``'s write-ahead log every ``nbytes`` of it, whatever the page size the
    file was made with (SQLite counts the interval in pages)."""
    page = int(db.execute("PRAGMA page_size").fetchone()[0])
    db.execute(f"PRAGMA wal_autocheckpoint={max(1, nbytes // page)}")
