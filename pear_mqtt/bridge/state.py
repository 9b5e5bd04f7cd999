"""The bridge's durable state, one SQLite file (WAL, mode 0600): open windows and the items
counted into them (one row per sender and item id: a later copy replaces the earlier one), the
ε ledger, the outboxes of messages to publish (public and consortium), and the receipts
issued. Closing a window (for the consortium, then for the public), spending its budget and
queuing its messages are one transaction each, so a restart neither counts an item twice
nor publishes a window again with fresh noise.
The schema and its guarantees are described in docs/BRIDGE.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic_core import to_json

from ..errors import OutboxError
from ..sqlrows import checkpoint_every, insert_rows

__all__ = [
    "AddResult",
    "BridgeStore",
    "LedgerEntry",
    "NewContribution",
    "OutgoingRow",
    "StoredContribution",
    "WindowInfo",
    "WindowState",
]

WindowState = Literal["open", "ready", "published"]

_SCHEMA_VERSION = 1
_PAGE_SIZE = 16384
_CACHE_KIB = 32768
_CHECKPOINT_BYTES = 16 * 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS windows (
    start       INTEGER PRIMARY KEY,
    state       TEXT NOT NULL CHECK (state IN ('open', 'ready', 'published')),
    first_input REAL NOT NULL,
    last_input  REAL NOT NULL,
    items       INTEGER NOT NULL DEFAULT 0,
    closed_at   REAL,
    published_at REAL
);
CREATE TABLE IF NOT EXISTS contributions (
    source_key   TEXT NOT NULL,
    item_id      TEXT NOT NULL,
    window_start INTEGER NOT NULL,
    category     TEXT NOT NULL,
    region       TEXT NOT NULL,
    domain       TEXT NOT NULL,
    company      TEXT NOT NULL,
    currency     TEXT,
    vals         TEXT NOT NULL,
    digest       BLOB NOT NULL,
    token_digest BLOB,
    received_at  REAL NOT NULL,
    PRIMARY KEY (source_key, item_id)
);
CREATE INDEX IF NOT EXISTS contributions_window ON contributions (window_start);
CREATE TABLE IF NOT EXISTS tokens (
    token_digest BLOB PRIMARY KEY,
    window_start INTEGER NOT NULL,
    source_key   TEXT NOT NULL,
    item_id      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    window_start INTEGER NOT NULL,
    topic        TEXT NOT NULL,
    payload      BLOB NOT NULL,
    retain       INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger (
    period_start INTEGER PRIMARY KEY,
    epsilon      REAL NOT NULL,
    delta        REAL NOT NULL,
    cells        INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS consortium_windows (
    start     INTEGER PRIMARY KEY,
    closed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS consortium_outbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    window_start INTEGER NOT NULL,
    topic        TEXT NOT NULL,
    payload      BLOB NOT NULL,
    retain       INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS partials (
    window_start INTEGER NOT NULL,
    instance     INTEGER NOT NULL,
    part         INTEGER NOT NULL,
    parts        INTEGER NOT NULL,
    PRIMARY KEY (window_start, instance, part)
);
CREATE TABLE IF NOT EXISTS receipts (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    window_start INTEGER NOT NULL,
    category     TEXT NOT NULL,
    payload      BLOB NOT NULL
);
"""

_INSERT_ROWS = "INSERT OR IGNORE INTO contributions"  # many rows a statement: sqlrows
_INSERT = f"{_INSERT_ROWS} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_REPLACE = ("UPDATE OR IGNORE contributions SET window_start=?, category=?, region=?, domain=?, "
            "company=?, currency=?, vals=?, digest=?, token_digest=?, received_at=? "
            "WHERE source_key=? AND item_id=?")
_TOKEN_ROWS = "INSERT OR IGNORE INTO tokens"
_TOKEN = f"{_TOKEN_ROWS} VALUES (?, ?, ?, ?)"


def _inserted(db: sqlite3.Connection, head: str, rows: Sequence[Sequence[object]],
              width: int) -> int:
    """How many of ``rows`` ``head`` (an ``INSERT OR IGNORE``) inserted."""
    return sum(cur.rowcount for cur in insert_rows(db, head, rows, width=width))


def _values_json(values: Mapping[str, Mapping[str, float]]) -> str:
    """``values`` as JSON for the ``vals`` column (read back with :func:`json.loads`)."""
    for fields in values.values():
        for value in fields.values():
            if not math.isfinite(value):
                raise ValueError(f"a stored value must be a finite number, got {value!r}")
    # pydantic-core writes this small document ~4x faster than json.dumps, and its shortest
    # round-trip floats read back as the same values.
    return to_json(values).decode()


class NewContribution(NamedTuple):
    """One verified, policy-checked item to count in ``window_start``'s window (a named
    tuple: one is built per item ingested, in half a frozen dataclass's time)."""

    source_key: str  # "<network>/<member>": item ids are unique per sender, not globally
    item_id: str
    window_start: int
    category: str
    region: str
    domain: str  # identity domain: companies are comparable only within one domain
    company: str  # the company's identity within the domain
    currency: str | None
    values: dict[str, dict[str, float]]
    digest: bytes  # the item digest that goes into the receipt's input hash
    token_digest: bytes | None  # SHA-256 of the sealed token: a copied token is refused


@dataclass(frozen=True, slots=True, kw_only=True)
class AddResult:
    """What :meth:`BridgeStore.add` did with a batch: new items ``counted``, earlier items
    ``replaced`` by a changed copy, unchanged copies (``duplicates``) and items refused for
    a sealed token another item carried (``copied``)."""

    counted: int
    duplicates: int
    copied: int
    replaced: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredContribution:
    """A counted item as the aggregation reads it back."""

    item_id: str
    category: str
    region: str
    domain: str
    company: str
    currency: str | None
    values: dict[str, dict[str, float]]
    digest: bytes
    source_key: str = ""
    token_digest: bytes | None = None

    @property
    def source(self) -> str:
        """The kind of input it came from: ``consortium``, ``private`` or ``public``."""
        return self.source_key.split("/", 1)[0]


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowInfo:
    """An open window: when its first and latest inputs arrived, and how many it holds."""

    start: int
    first_input: float
    last_input: float
    items: int


@dataclass(frozen=True, slots=True, kw_only=True)
class OutgoingRow:
    """One message waiting in the outbox for the public broker's acknowledgement."""

    id: int
    window_start: int
    topic: str
    payload: bytes
    retain: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerEntry:
    """ε and δ spent in one budget period, over ``cells`` published cells."""

    period_start: int
    epsilon: float
    delta: float
    cells: int


class BridgeStore:
    """The bridge's SQLite file (see the module docstring).

    Raises :class:`~pear_mqtt.errors.OutboxError` when the file cannot be opened or written.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():
                # Exact values of open windows live here: owner-only from the first byte.
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            self._db = sqlite3.connect(self.path, isolation_level=None)
            # Items arrive in no order of the contributions' and tokens' keys (a sender and
            # a random item id, a token digest), so a batch dirties pages all over those
            # trees: larger pages make fewer to write at each commit (a new file only), a
            # cache that holds the open windows' trees keeps them from being read back
            # from the log, and the log is checkpointed every 16 MB, not 4 (BRIDGE.md).
            self._db.execute(f"PRAGMA page_size={_PAGE_SIZE}")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
            checkpoint_every(self._db, _CHECKPOINT_BYTES)
            # WAL + NORMAL survives a crash of the process (the case a restart must handle);
            # only a power cut may lose the last transactions.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            # A file written before the tokens table existed: its open items' tokens.
            self._db.execute("INSERT OR IGNORE INTO tokens SELECT token_digest, window_start, "
                             "source_key, item_id FROM contributions "
                             "WHERE token_digest IS NOT NULL")
            row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(_SCHEMA_VERSION),))
            elif row[0] != str(_SCHEMA_VERSION):
                raise OutboxError(f"{self.path}: bridge state schema {row[0]}, this build "
                                  f"reads {_SCHEMA_VERSION}")
            self._states: dict[int, WindowState] = {
                int(start): state for start, state in
                self._db.execute("SELECT start, state FROM windows")}
            self._frozen: set[int] = {int(start) for (start,) in self._db.execute(
                "SELECT start FROM consortium_windows")}
        except sqlite3.Error as exc:
            raise OutboxError(f"{self.path}: cannot open the bridge state: {exc}") from exc

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise OutboxError(f"{self.path}: bridge state write failed: {exc}") from exc

    def close(self) -> None:
        """Close the file (idempotent)."""
        with contextlib.suppress(sqlite3.Error):
            self._db.close()

    # -- meta ----------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # -- windows and contributions -------------------------------------------------------
    def window_state(self, start: int) -> WindowState | None:
        """The state of the window starting at ``start`` (None: never seen)."""
        return self._states.get(start)

    def add(self, items: Sequence[NewContribution], *, now: float) -> AddResult:
        """Count ``items`` (their windows must be open or new).

        One row per (source, item id): an item seen before with the same digest is a
        duplicate (a redelivery) and changes nothing, and so is a redelivery of a version the
        item has since replaced (its sealed token is one the item carried before); with
        another digest it is a later copy of the same observation (re-sent or re-read) and
        replaces the earlier values, so the observation counts once with its latest values.
        An item whose sealed token another item of an open window carried, even one since
        replaced, is refused (``copied``): only a sender replaying someone else's token does
        that.
        """
        if not items:
            return AddResult(counted=0, duplicates=0, copied=0)
        states = self._states
        touched: dict[int, int] = {}
        rows: list[tuple[object, ...]] = []
        tokens: list[tuple[bytes, int, str, str]] = []
        for it in items:
            start = it.window_start
            state = states.get(start)
            if (state is not None and state != "open") or start in self._frozen:
                raise OutboxError(f"window {start} is {state or 'open'} and closed for the "
                                  "consortium; late items must be dropped before they "
                                  "reach the store")
            touched[start] = touched.get(start, 0) + 1
            rows.append((it.source_key, it.item_id, start, it.category, it.region,
                         it.domain, it.company, it.currency,
                         _values_json(it.values), it.digest, it.token_digest, now))
            if it.token_digest is not None:
                tokens.append((it.token_digest, start, it.source_key, it.item_id))
        counted = duplicates = copied = replaced = 0
        with self._tx() as db:
            # One statement per table for the whole batch. Redeliveries, later copies and
            # copied tokens are rare, so only a batch that hit one (fewer rows inserted than
            # given) is undone and classified row by row.
            db.execute("SAVEPOINT batch")
            if (_inserted(db, _INSERT_ROWS, rows, 12) == len(rows)
                    and _inserted(db, _TOKEN_ROWS, tokens, 4) == len(tokens)):
                counted = len(rows)
            else:
                db.execute("ROLLBACK TO batch")
                touched = {}
                for it, row in zip(items, rows, strict=True):
                    outcome = self._add_one(db, it, row)
                    if outcome == "counted":
                        counted += 1
                    elif outcome == "replaced":
                        replaced += 1
                    elif outcome == "duplicate":
                        duplicates += 1
                        continue
                    else:
                        copied += 1
                        continue
                    touched[it.window_start] = (touched.get(it.window_start, 0)
                                                + (outcome == "counted"))
            db.execute("RELEASE batch")
            for start, n in touched.items():
                db.execute(
                    "INSERT INTO windows (start, state, first_input, last_input, items) "
                    "VALUES (?, 'open', ?, ?, ?) ON CONFLICT (start) DO UPDATE SET "
                    "last_input=excluded.last_input, items=items+excluded.items",
                    (start, now, now, n))
        for start in touched:
            self._states.setdefault(start, "open")
        return AddResult(counted=counted, duplicates=duplicates, copied=copied,
                         replaced=replaced)

    @staticmethod
    def _add_one(db: sqlite3.Connection, it: NewContribution, row: tuple[object, ...]
                 ) -> Literal["counted", "replaced", "duplicate", "copied"]:
        """Store one item inside :meth:`add`'s transaction and say what it was."""
        key = (it.source_key, it.item_id)
        found = db.execute("SELECT digest, token_digest FROM contributions "
                           "WHERE source_key=? AND item_id=?", key).fetchone()
        if found is not None and bytes(found[0]) == it.digest:
            return "duplicate"
        if it.token_digest is not None:
            owner = db.execute("SELECT source_key, item_id FROM tokens WHERE token_digest=?",
                               (it.token_digest,)).fetchone()
            if owner is None:
                db.execute(_TOKEN, (it.token_digest, it.window_start, *key))
            elif tuple(owner) != key:
                return "copied"
            elif found is None or found[1] is None or bytes(found[1]) != it.token_digest:
                return "duplicate"  # an earlier version of this item, delivered again
        if found is None:
            return "counted" if db.execute(_INSERT, row).rowcount == 1 else "copied"
        changed = db.execute(_REPLACE, (*row[2:], *key)).rowcount
        return "replaced" if changed == 1 else "copied"

    def frozen(self, start: int) -> bool:
        """Whether the window starting at ``start`` was closed for the consortium: its items
        are fixed from then on (what the public gets later is over the very same items)."""
        return start in self._frozen

    def close_consortium(self, window_start: int, *, now: float,
                         outgoing: Sequence[tuple[str, bytes, bool]],
                         receipts: Sequence[tuple[str, bytes]] = ()) -> None:
        """Close a window for the consortium in one transaction: it takes no more items, its
        consortium messages go to the consortium outbox and its receipts to the archive. Its
        items stay for the public close."""
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO consortium_windows VALUES (?, ?)",
                       (window_start, now))
            db.executemany("INSERT INTO consortium_outbox (window_start, topic, payload, "
                           "retain) VALUES (?, ?, ?, ?)",
                           [(window_start, t, p, int(r)) for t, p, r in outgoing])
            db.executemany("INSERT INTO receipts (window_start, category, payload) "
                           "VALUES (?, ?, ?)",
                           [(window_start, c, p) for c, p in receipts])
        self._frozen.add(window_start)

    def consortium_pending(self) -> list[OutgoingRow]:
        """Consortium messages not yet acknowledged by the consortium broker, in order."""
        return [OutgoingRow(id=int(i), window_start=int(w), topic=t, payload=bytes(p),
                            retain=bool(r))
                for i, w, t, p, r in self._db.execute(
                    "SELECT id, window_start, topic, payload, retain FROM consortium_outbox "
                    "ORDER BY id")]

    def acknowledge_consortium(self, ids: Sequence[int]) -> None:
        """Drop consortium messages the consortium broker acknowledged."""
        with self._tx() as db:
            db.executemany("DELETE FROM consortium_outbox WHERE id=?", [(i,) for i in ids])

    # -- scale-out (docs/BRIDGE.md, "Scale-out") -------------------------------------------
    def close_partial(self, window_start: int, *, now: float,
                      outgoing: Sequence[tuple[str, bytes, bool]]) -> None:
        """A scale-out worker's close of a window (known or not) in one transaction: its
        partial goes to the consortium outbox, its exact values are deleted, and it takes
        no more items (it is ``published`` for this worker)."""
        with self._tx() as db:
            db.execute("INSERT INTO windows (start, state, first_input, last_input, items, "
                       "closed_at, published_at) VALUES (?, 'published', ?, ?, 0, ?, ?) "
                       "ON CONFLICT (start) DO UPDATE SET state='published', "
                       "closed_at=excluded.closed_at, published_at=excluded.published_at",
                       (window_start, now, now, now, now))
            db.execute("DELETE FROM contributions WHERE window_start=?", (window_start,))
            db.execute("DELETE FROM tokens WHERE window_start=?", (window_start,))
            db.executemany("INSERT INTO consortium_outbox (window_start, topic, payload, "
                           "retain) VALUES (?, ?, ?, ?)",
                           [(window_start, t, p, int(r)) for t, p, r in outgoing])
        self._states[window_start] = "published"

    def open_window(self, window_start: int, *, now: float) -> None:
        """Open a window with no items (unless it is known already), as if an input for it
        had arrived at ``now``."""
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO windows (start, state, first_input, last_input, "
                       "items) VALUES (?, 'open', ?, ?, 0)", (window_start, now, now))
        self._states.setdefault(window_start, "open")

    def record_partial(self, window_start: int, *, instance: int, part: int,
                       parts: int) -> None:
        """The merger received part ``part`` of ``parts`` of ``instance``'s partial."""
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO partials VALUES (?, ?, ?, ?)",
                       (window_start, instance, part, parts))

    def partial_parts(self, window_start: int) -> list[tuple[int, int]]:
        """(instance, part) of every partial part the merger received for a window."""
        return [(int(i), int(p)) for i, p in self._db.execute(
            "SELECT instance, part FROM partials WHERE window_start=? ORDER BY instance, part",
            (window_start,))]

    def clear_partials(self, window_start: int, topics: Sequence[str]) -> None:
        """Queue empty retained messages that clear ``topics`` (a merged window's partials)
        on the consortium broker."""
        with self._tx() as db:
            db.executemany("INSERT INTO consortium_outbox (window_start, topic, payload, "
                           "retain) VALUES (?, ?, ?, 1)",
                           [(window_start, t, b"") for t in topics])

    def partial_progress(self, instances: int) -> dict[int, list[int]]:
        """Per window with any partial received: the instances whose partial is still
        incomplete (empty when the window can be merged)."""
        have: dict[int, dict[int, tuple[int, int]]] = {}
        for w, i, n, parts in self._db.execute(
                "SELECT window_start, instance, COUNT(*), MAX(parts) FROM partials "
                "WHERE window_start NOT IN (SELECT start FROM windows WHERE state!='open') "
                "GROUP BY window_start, instance"):
            have.setdefault(int(w), {})[int(i)] = (int(n), int(parts))
        return {w: [i for i in range(instances)
                    if i not in got or got[i][0] < got[i][1]]
                for w, got in have.items()}

    def open_windows(self) -> list[WindowInfo]:
        """Every open window, oldest first."""
        return [WindowInfo(start=int(s), first_input=float(f), last_input=float(la),
                           items=int(n))
                for s, f, la, n in self._db.execute(
                    "SELECT start, first_input, last_input, items FROM windows "
                    "WHERE state='open' ORDER BY start")]

    def contributions(self, window_start: int) -> list[StoredContribution]:
        """The counted items of a window, in a stable order."""
        return [StoredContribution(item_id=iid, category=cat, region=reg, domain=dom,
                                   company=comp, currency=cur, values=json.loads(vals),
                                   digest=bytes(dig), source_key=src,
                                   token_digest=None if tok is None else bytes(tok))
                for src, iid, cat, reg, dom, comp, cur, vals, dig, tok in self._db.execute(
                    "SELECT source_key, item_id, category, region, domain, company, currency, "
                    "vals, digest, token_digest FROM contributions WHERE window_start=? "
                    "ORDER BY category, region, source_key, item_id", (window_start,))]

    def close_window(self, window_start: int, *, now: float,
                     outgoing: Sequence[tuple[str, bytes, bool]],
                     receipts: Sequence[tuple[str, bytes]],
                     ledger: Sequence[LedgerEntry]) -> None:
        """Close a window in one transaction: its messages go to the outbox, ``ledger``
        amounts are added to the spent budget, its receipts are archived, and its exact
        values are deleted."""
        with self._tx() as db:
            db.execute("UPDATE windows SET state='ready', closed_at=? WHERE start=?",
                       (now, window_start))
            db.execute("DELETE FROM contributions WHERE window_start=?", (window_start,))
            db.execute("DELETE FROM tokens WHERE window_start=?", (window_start,))
            db.executemany("INSERT INTO outbox (window_start, topic, payload, retain) "
                           "VALUES (?, ?, ?, ?)",
                           [(window_start, t, p, int(r)) for t, p, r in outgoing])
            db.executemany("INSERT INTO receipts (window_start, category, payload) "
                           "VALUES (?, ?, ?)",
                           [(window_start, c, p) for c, p in receipts])
            for e in ledger:
                db.execute(
                    "INSERT INTO ledger VALUES (?, ?, ?, ?) ON CONFLICT (period_start) DO "
                    "UPDATE SET epsilon=epsilon+excluded.epsilon, delta=delta+excluded.delta, "
                    "cells=cells+excluded.cells",
                    (e.period_start, e.epsilon, e.delta, e.cells))
            if not outgoing:
                db.execute("UPDATE windows SET state='published', published_at=? WHERE start=?",
                           (now, window_start))
        self._states[window_start] = "ready" if outgoing else "published"

    # -- outbox --------------------------------------------------------------------------
    def pending(self) -> list[OutgoingRow]:
        """Messages not yet acknowledged by the public broker, in the order to send them."""
        return [OutgoingRow(id=int(i), window_start=int(w), topic=t, payload=bytes(p),
                            retain=bool(r))
                for i, w, t, p, r in self._db.execute(
                    "SELECT id, window_start, topic, payload, retain FROM outbox ORDER BY id")]

    def acknowledge(self, ids: Sequence[int], *, now: float) -> list[int]:
        """Drop acknowledged messages; returns the windows that are now fully published."""
        done: list[int] = []
        with self._tx() as db:
            windows = {int(w) for (w,) in db.execute(
                f"SELECT DISTINCT window_start FROM outbox WHERE id IN "
                f"({','.join('?' * len(ids))})", list(ids))} if ids else set()
            db.executemany("DELETE FROM outbox WHERE id=?", [(i,) for i in ids])
            for w in sorted(windows):
                left = db.execute("SELECT COUNT(*) FROM outbox WHERE window_start=?",
                                  (w,)).fetchone()[0]
                if left == 0:
                    db.execute("UPDATE windows SET state='published', published_at=? "
                               "WHERE start=?", (now, w))
                    done.append(w)
        for w in done:
            self._states[w] = "published"
        return done

    @property
    def outbox_depth(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    @property
    def consortium_outbox_depth(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM consortium_outbox").fetchone()[0])

    # -- ledger and receipts -------------------------------------------------------------
    def ledger(self) -> list[LedgerEntry]:
        """Spent budget per period, oldest first."""
        return [LedgerEntry(period_start=int(p), epsilon=float(e), delta=float(d),
                            cells=int(c))
                for p, e, d, c in self._db.execute(
                    "SELECT period_start, epsilon, delta, cells FROM ledger "
                    "ORDER BY period_start")]

    def spent(self, period_start: int) -> float:
        """ε spent so far in the period starting at ``period_start``."""
        row = self._db.execute("SELECT epsilon FROM ledger WHERE period_start=?",
                               (period_start,)).fetchone()
        return 0.0 if row is None else float(row[0])

    def receipts(self) -> Iterator[tuple[int, str, bytes]]:
        """(window start, category, signed receipt) of every receipt issued, oldest first."""
        for w, c, p in self._db.execute(
                "SELECT window_start, category, payload FROM receipts ORDER BY id"):
            yield int(w), str(c), bytes(p)

    def counts(self) -> dict[str, int]:
        """Windows per state and open items, for status reports."""
        out = {"open": 0, "ready": 0, "published": 0}
        for state, n in self._db.execute("SELECT state, COUNT(*) FROM windows GROUP BY state"):
            out[str(state)] = int(n)
        out["open_items"] = int(self._db.execute(
            "SELECT COUNT(*) FROM contributions").fetchone()[0])
        return out
