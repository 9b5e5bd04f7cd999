"""MarketStore: a node's local, indexed store of the market data it received and verified,
and the queries a pricing team asks of it. One SQLite file per network; the engine choice,
layout and retention are argued in docs/MARKET.md."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, overload

from ..errors import MarketError
from ..node.records import ReceivedAggregate, ReceivedInsight
from . import queries
from .export import export_rows
from .position import price_position
from .queries import Filter
from .rows import AggregateRow, GroupRow, HistogramRow, MarketRow, Page, PricePosition, StoreStatus
from .schema import connect, ensure
from .writer import Retention, Row, Writer, size_on_disk

__all__ = ["MarketStore", "Retention"]

_POLL = 1.0  # s between checks for rows another process wrote (watch on a shared file)


class MarketStore:
    """The market data one node holds, for one network.

    ::

        store = MarketStore.open("node.market.db")
        store.query(category="grocery/dairy", since=month_ago, group_by="day")
        store.price_position("grocery/dairy", 2.49)

    Writes come from the node's receive path (:meth:`add`, in batches); reads never wait
    for them. Closing it is required (``with MarketStore.open(...) as store``).
    """

    def __init__(self, *, path: Path, writer: sqlite3.Connection | None,
                 reader: sqlite3.Connection, network: str, mode: str, retention: Retention,
                 temporary: Path | None = None) -> None:
        self.path = path
        self.network = network
        self.mode = mode
        self._wconn = writer
        self._writer = None if writer is None else Writer(writer, path=path,
                                                          retention=retention)
        self._rconn = reader
        self._rlock = threading.Lock()
        self._temporary = temporary
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._closed = False

    @classmethod
    def open(cls, path: Path | str, *, network: str | None = None, mode: str | None = None,
             retention: Retention | None = None, readonly: bool = False) -> MarketStore:
        """Open the store at ``path``; with ``network`` and ``mode`` it is created when
        missing and refused when it holds another network. ``readonly`` for analysis beside
        a running node."""
        path = Path(path)
        if (readonly or network is None) and not path.exists():
            raise MarketError(f"market store {path}: no such file; give the node's "
                              "market.path (default: next to its outbox, "
                              "'<outbox>.market.db')")
        writer = None if readonly else connect(path)
        reader: sqlite3.Connection | None = None
        try:
            if writer is None:
                reader = connect(path, readonly=True)
            held_network, held_mode = ensure(writer or reader, path,  # type: ignore[arg-type]
                                             network=network, mode=mode)
            reader = reader or connect(path, readonly=True)
        except BaseException:
            for conn in (writer, reader):
                if conn is not None:
                    conn.close()
            raise
        return cls(path=path, writer=writer, reader=reader, network=held_network,
                   mode=held_mode, retention=retention or Retention())

    @classmethod
    def temporary(cls, *, network: str, mode: str,
                  retention: Retention | None = None) -> MarketStore:
        """A store in a temporary directory, removed on :meth:`close` (a node without a
        place on disk for it)."""
        tmp = Path(tempfile.mkdtemp(prefix="pear-market-"))
        store = cls.open(tmp / "market.db", network=network, mode=mode, retention=retention)
        store._temporary = tmp
        return store

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._rlock:
            self._rconn.close()
        if self._wconn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._wconn.execute("PRAGMA optimize")
            self._wconn.close()
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)

    def __enter__(self) -> MarketStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ------------------------------------------------------------------------------
    def add(self, items: Sequence[ReceivedInsight | ReceivedAggregate], *,
            now: float | None = None) -> int:
        """Store verified items in one transaction; returns how many rows were new.
        Duplicates are stored once; a newer version of an item replaces the older."""
        insights: list[ReceivedInsight] = []
        aggregates: list[ReceivedAggregate] = []
        for item in items:
            if isinstance(item, ReceivedInsight):
                insights.append(item)
            elif isinstance(item, ReceivedAggregate):
                aggregates.append(item)
        added = self.add_rows(self.rows(insights), aggregates, now=now)
        self.changed()
        return added

    def rows(self, insights: Sequence[ReceivedInsight]) -> list[Row]:
        """The rows :meth:`add_rows` takes, of ``insights``; an insight that makes none is
        counted as refused."""
        return self._writable().rows(insights)

    def row(self, received: ReceivedInsight) -> Row | None:
        """The row of one insight (see :meth:`rows`); None if it makes none."""
        return self._writable().row(received)

    def add_rows(self, rows: list[Row], aggregates: Sequence[ReceivedAggregate], *,
                 now: float | None = None) -> int:
        """Like :meth:`add`, of rows made by :meth:`rows` (kept by the caller while the
        store cannot write); watchers are not woken (:meth:`changed`)."""
        try:
            return self._writable().write_rows(rows, aggregates,
                                               now=time.time() if now is None else now)
        except sqlite3.Error as exc:
            raise MarketError(f"market store {self.path}: cannot write ({exc}); check the "
                              "free space and permissions there") from exc

    def changed(self) -> None:
        """Wake this store's watchers: rows were written."""
        for loop, event in list(self._waiters):
            with contextlib.suppress(RuntimeError):  # a loop that closed meanwhile
                loop.call_soon_threadsafe(event.set)

    def _writable(self) -> Writer:
        if self._writer is None:
            raise MarketError(f"market store {self.path} is open read-only")
        return self._writer

    # -- reading ------------------------------------------------------------------------------
    @overload
    def query(self, *, category: str | None = ..., region: str | None = ...,
              member: str | None = ..., since: datetime | None = ...,
              until: datetime | None = ..., group_by: None = ..., metric: str | None = ...,
              limit: int = ..., cursor: int | None = ...) -> Page: ...

    @overload
    def query(self, *, category: str | None = ..., region: str | None = ...,
              member: str | None = ..., since: datetime | None = ...,
              until: datetime | None = ..., group_by: Literal["day", "week"],
              metric: str | None = ..., limit: int = ...,
              cursor: int | None = ...) -> list[GroupRow]: ...

    def query(self, *, category: str | None = None, region: str | None = None,
              member: str | None = None, since: datetime | None = None,
              until: datetime | None = None, group_by: Literal["day", "week"] | None = None,
              metric: str | None = None, limit: int = 1000,
              cursor: int | None = None) -> Page | list[GroupRow]:
        """Rows (a :class:`Page`: ``limit`` rows after ``cursor``, and the next cursor) or,
        with ``group_by``, one :class:`GroupRow` per period and metric. ``category``
        includes its sub-categories; ``since``/``until`` bound the windows' ends."""
        flt = Filter(category=category, region=region, member=member, since=since,
                     until=until)
        with self._reading():
            if group_by is None:
                return queries.page(self._rconn, flt, limit=limit, cursor=cursor)
            if group_by not in ("day", "week"):
                raise MarketError(f"group_by must be 'day', 'week' or None, not {group_by!r}")
            return queries.grouped(self._rconn, flt, group_by, metric)

    def history(self, category: str, metric: str = "price", *, region: str | None = None,
                since: datetime | None = None, until: datetime | None = None,
                group_by: Literal["day", "week"] = "day") -> list[GroupRow]:
        """A time series of one metric: from the insights this node received or, when it
        holds none (a public node), from the bridge's aggregates, one point per window."""
        flt = Filter(category=category, region=region, since=since, until=until)
        with self._reading():
            series = queries.grouped(self._rconn, flt, group_by, metric)
            if series:
                return series
            cells = queries.aggregates(self._rconn, flt, field=metric)
        return [GroupRow(period=c.window_start, category=c.category, region=c.region,
                         metric=c.field, count=c.count, companies=c.companies, mean=c.mean,
                         stddev=c.stddev, low=None, high=None, exact=False) for c in cells]

    def latest(self, category: str | None = None, *,
               region: str | None = None) -> list[MarketRow]:
        """The newest row of each sender per category, region and product."""
        with self._reading():
            return queries.latest(self._rconn, Filter(category=category, region=region))

    def aggregates(self, category: str | None = None, *, region: str | None = None,
                   since: datetime | None = None, until: datetime | None = None,
                   field: str | None = None) -> list[AggregateRow]:
        """The bridge's aggregate cells this node received (oldest window first)."""
        with self._reading():
            return queries.aggregates(self._rconn, Filter(category=category, region=region,
                                                          since=since, until=until),
                                      field=field)

    def histograms(self, category: str | None = None, *, region: str | None = None,
                   since: datetime | None = None, until: datetime | None = None,
                   field: str | None = None) -> list[HistogramRow]:
        """The price bucket histograms of the aggregate cells this node received."""
        with self._reading():
            return queries.histograms(self._rconn, Filter(category=category, region=region,
                                                          since=since, until=until),
                                      field=field)

    def price_position(self, category: str, price: float, *,
                       region: str | None = None) -> PricePosition:
        """Where ``price`` stands in ``category`` against what this node may see."""
        with self._reading():
            return price_position(self._rconn, category=category, price=price, region=region)

    async def watch(self, *, category: str | None = None, region: str | None = None,
                    member: str | None = None, cursor: int | None = None
                    ) -> AsyncIterator[MarketRow]:
        """Every matching row from now on (or after ``cursor``), as it is stored; ends when
        the store closes."""
        flt = Filter(category=category, region=region, member=member)
        if cursor is None:
            with self._reading():
                cursor = int(self._rconn.execute(
                    "SELECT coalesce(max(id), 0) FROM insights").fetchone()[0])
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event)
        self._waiters.append(waiter)
        try:
            while not self._closed:
                event.clear()
                with self._reading():
                    got = queries.page(self._rconn, flt, limit=1000, cursor=cursor)
                for row in got.rows:
                    yield row
                    cursor = row.id
                if got.next_cursor is not None:
                    continue
                # Woken by a write here, or polling for another process's writes.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), _POLL)
        finally:
            self._waiters.remove(waiter)

    def export(self, path: Path | str, *, fmt: Literal["csv", "parquet"] = "csv",
               kind: Literal["insights", "aggregates"] = "insights",
               category: str | None = None, region: str | None = None,
               since: datetime | None = None, until: datetime | None = None) -> int:
        """Write the matching insight rows (or aggregate cells) to ``path`` as CSV or
        Parquet, with the disclosure they were received with; returns how many."""
        if self._closed:
            raise MarketError(f"market store {self.path} is closed")
        flt = Filter(category=category, region=region, since=since, until=until)
        conn = connect(self.path, readonly=True)  # its own snapshot: writes go on meanwhile
        try:
            rows: Iterable[MarketRow | AggregateRow] = (
                queries.rows_after(conn, flt, 0) if kind == "insights"
                else queries.aggregates(conn, flt))
            return export_rows(rows, Path(path), kind=kind, fmt=fmt)
        except sqlite3.Error as exc:
            raise MarketError(f"market store {self.path}: cannot export ({exc})") from exc
        except OSError as exc:
            raise MarketError(f"cannot write {path}: {exc.strerror or exc}") from exc
        finally:
            conn.close()

    def status(self) -> StoreStatus:
        with self._reading():
            c = self._rconn
            insights = c.execute("SELECT count(*) FROM insights").fetchone()[0]
            aggregates = c.execute("SELECT count(*) FROM aggregates").fetchone()[0]
            oldest = c.execute("SELECT min(w) FROM (SELECT min(window_end) AS w FROM insights "
                               "WHERE day = (SELECT min(day) FROM insights) "
                               "UNION ALL SELECT min(window_end) FROM aggregates)").fetchone()[0]
        return StoreStatus(path=str(self.path), insights=insights, aggregates=aggregates,
                           bytes=size_on_disk(self.path),
                           oldest=None if oldest is None else datetime.fromtimestamp(oldest,
                                                                                     UTC),
                           refused=0 if self._writer is None else self._writer.refused)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        if self._closed:
            raise MarketError(f"market store {self.path} is closed")
        with self._rlock:
            try:
                yield
            except sqlite3.Error as exc:
                raise MarketError(f"market store {self.path}: cannot read ({exc})") from exc
