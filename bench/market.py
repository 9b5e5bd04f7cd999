"""The market store's figures (issue #18): ingest of verified rows, grouped queries and price
positions over a store of a million insights, its size per insight, and the same workload on
DuckDB when it is installed (the engine comparison of docs/MARKET.md). In-process: no broker
is involved, the store is fed what a receiver hands it. ``python -m bench.market feed``
prints the CPU a live stream's feed costs per item (docs/MARKET.md, "The live stream")."""

from __future__ import annotations

import dataclasses
import gc
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

__all__ = ["feed_cost", "run_market"]

_T0 = datetime(2026, 1, 1, tzinfo=UTC)
_CATEGORIES = [f"cat{i}/sub{j}" for i in range(5) for j in range(4)]
_BATCH = 5000  # what the live feed gathers under load between two commits


def _received(n: int, *, seed: int = 7) -> list[Any]:
    """``n`` verified consortium-style insights (price buckets, the direction) over a year,
    20 categories, 5 regions, 40 members, as the receiver hands them to the store."""
    from pear_mqtt.node.records import ReceivedInsight
    from pear_mqtt.privacy.filter import SharedInsight
    rnd = random.Random(seed)
    out = []
    for k in range(n):
        start = _T0 + timedelta(days=k * 365 // n, seconds=k % 80_000)
        member = f"m{k % 40}"
        lo = float(int(rnd.uniform(1, 10)))
        shared = SharedInsight.model_validate({
            "category": _CATEGORIES[k % len(_CATEGORIES)], "region": f"r{k % 5}",
            "product_id": f"p{k % 1000}", "window_start": start,
            "window_end": start + timedelta(hours=1), "company": member, "store": "s1",
            "levels": {"price_data": "ranges_only", "trends": "full"},
            "groups": {"price_data": {"currency": "EUR", "price": {"lo": lo, "hi": lo + 1}},
                       "trends": {"direction": "up"}}})
        out.append(ReceivedInsight(item_id=f"i{k}", topic="t", member=member, node="s1",
                                   insight=shared, retained=False,
                                   received_at=start.timestamp() + 3600, sequence=k))
    return out


def _p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def _queries(store: Any) -> dict[str, float]:
    grouped, positions = [], []
    for i, cat in enumerate(_CATEGORIES * 3):
        since = _T0 + timedelta(days=30 + 7 * i)
        t = time.perf_counter()
        store.query(category=cat, since=since, until=since + timedelta(days=90),
                    group_by="day")
        grouped.append(time.perf_counter() - t)
        t = time.perf_counter()
        store.price_position(cat, 5.5)
        positions.append(time.perf_counter() - t)
    return {"grouped_p50_ms": _p50_ms(grouped), "position_p50_ms": _p50_ms(positions)}


def run_market(workdir: Path, *, rows: int = 1_000_000, distinct: int = 100_000) -> dict[str, Any]:
    """Fill a store with ``rows`` insights (``distinct`` built, then copied under other item
    ids and members) in batches, timing the ingest; then time the queries."""
    from pear_mqtt.market import MarketStore
    workdir.mkdir(parents=True, exist_ok=True)
    base = _received(min(distinct, rows))
    path = workdir / "market.db"
    store = MarketStore.open(path, network="bench", mode="consortium")
    try:
        spent = 0.0
        for copy in range(max(1, rows // distinct)):
            items = base if copy == 0 else [
                dataclasses.replace(r, item_id=f"{r.item_id}-{copy}",
                                    member=f"m{(int(r.member[1:]) + copy) % 40}")
                for r in base]
            # The fixture's items out of the collector's sight: a node holds only the batch
            # in flight, not 200,000 pre-built items, so collecting them is not the store's.
            gc.freeze()
            for at in range(0, len(items), _BATCH):
                t = time.perf_counter()
                store.add(items[at:at + _BATCH], now=time.time())
                spent += time.perf_counter() - t
        st = store.status()
        out: dict[str, Any] = {"rows": st.insights, "ingest_rate": st.insights / spent,
                               "bytes_per_insight": st.bytes / st.insights,
                               **_queries(store)}
    finally:
        gc.unfreeze()
        store.close()
    out.update(_duckdb(base, workdir))
    shutil.rmtree(workdir, ignore_errors=True)
    return out


def _duckdb(items: list[Any], workdir: Path) -> dict[str, Any]:
    """The same rows in DuckDB (when installed), with the same grouped query over the raw
    rows (DuckDB's strength, no roll-up) and the latest-per-sender position query."""
    try:
        import duckdb
        import pyarrow as pa
    except ImportError:
        return {}
    from pear_mqtt.market.values import unpack
    from pear_mqtt.market.writer import insight_row
    rows = []
    for r in items:
        row = insight_row(r)
        lo, hi = unpack(row[-1])["price"]  # type: ignore[arg-type]
        rows.append((*row[1:-1], lo, hi))
    con = duckdb.connect(str(workdir / "market.duckdb"))
    con.execute("CREATE TABLE insights (member VARCHAR, node VARCHAR, item_id VARCHAR, "
                "category VARCHAR, region VARCHAR, product VARCHAR, window_start DOUBLE, "
                "window_end DOUBLE, day INTEGER, received_at DOUBLE, seq BIGINT, "
                "log_ref VARCHAR, currency VARCHAR, direction VARCHAR, price_lo DOUBLE, "
                "price_hi DOUBLE, PRIMARY KEY (member, node, item_id))")
    insert = ("INSERT INTO insights VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
              "ON CONFLICT DO NOTHING")
    sample = rows[:300]  # row by row is DuckDB's slow path: a sample tells its rate
    t = time.perf_counter()
    con.executemany(insert, sample)
    row_rate = len(sample) / (time.perf_counter() - t)
    # Its fast path: a batch as an Arrow table, one INSERT ... SELECT per batch.
    names = ["member", "node", "item_id", "category", "region", "product", "window_start",
             "window_end", "day", "received_at", "seq", "log_ref", "currency", "direction",
             "price_lo", "price_hi"]
    t = time.perf_counter()
    for at in range(0, len(rows), _BATCH):
        batch = pa.table(dict(zip(names, zip(*rows[at:at + _BATCH], strict=True),
                                  strict=True)))
        con.register("batch", batch)
        con.execute("INSERT INTO insights SELECT * FROM batch ON CONFLICT DO NOTHING")
        con.unregister("batch")
    rate = len(rows) / (time.perf_counter() - t)
    grouped, positions = [], []
    for i, cat in enumerate(_CATEGORIES * 3):
        day = (_T0 + timedelta(days=30 + 7 * i)).timestamp() // 86400
        t = time.perf_counter()
        con.execute("SELECT day, count(*), count(DISTINCT member), avg((price_lo + price_hi)"
                    " / 2), min(price_lo), max(price_hi) FROM insights WHERE category = ? "
                    "AND day BETWEEN ? AND ? GROUP BY day", [cat, day, day + 90]).fetchall()
        grouped.append(time.perf_counter() - t)
        t = time.perf_counter()
        con.execute("SELECT arg_max(price_lo, window_end), arg_max(price_hi, window_end) "
                    "FROM insights WHERE category = ? GROUP BY member, node, region, product",
                    [cat]).fetchall()
        positions.append(time.perf_counter() - t)
    con.close()
    return {"duckdb": {"version": duckdb.__version__, "rows": len(rows),
                       "insert_rate": rate, "row_insert_rate": row_rate,
                       "grouped_p50_ms": _p50_ms(grouped),
                       "position_p50_ms": _p50_ms(positions)}}


def _stream(n: int) -> list[Any]:
    """``n`` items as a live stream brings them: one sender, 16 categories, 200 products,
    price buckets, windows of the same hour."""
    from pear_mqtt.node.records import ReceivedInsight
    from pear_mqtt.privacy.filter import SharedInsight
    now = time.time()
    t0 = datetime.fromtimestamp(now // 3600 * 3600, UTC)
    out = []
    for k in range(n):
        start = t0 + timedelta(seconds=k % 3600)
        lo = float(k % 9)
        shared = SharedInsight.model_validate({
            "category": f"cat{k % 16}", "region": "eu", "product_id": f"p{k % 200}",
            "window_start": start, "window_end": start + timedelta(hours=1),
            "company": "acme", "store": "s1",
            "levels": {"price_data": "ranges_only", "trends": "full"},
            "groups": {"price_data": {"currency": "EUR", "price": {"lo": lo, "hi": lo + 1}},
                       "trends": {"direction": "up"}}})
        out.append(ReceivedInsight(item_id=f"i{k}", topic="t", member="acme", node="s1",
                                   insight=shared, retained=False, received_at=now,
                                   sequence=k))
    return out


def feed_cost(workdir: Path, *, rate: float = 6000.0, seconds: float = 4.0,
              envelope: int = 24) -> dict[str, float]:
    """The process CPU per item of handing a paced stream (``rate`` items/s in envelopes of
    ``envelope``) to a :class:`MarketFeed` until stored, and of handing it to a plain list;
    their difference is what keeping the store costs the receiver's two cores."""
    from pear_mqtt.market import MarketStore
    from pear_mqtt.market.feed import MarketFeed
    n = int(rate * seconds)
    items = _stream(n)
    gc.freeze()

    def paced(sink: Any) -> float:
        cpu, t0 = time.process_time(), time.monotonic()
        for at in range(0, n, envelope):
            wait = t0 + at / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            for item in items[at:at + envelope]:
                sink(item)
        return cpu

    workdir.mkdir(parents=True, exist_ok=True)
    store = MarketStore.open(workdir / "feed.db", network="bench", mode="consortium")
    feed = MarketFeed(store)
    feed.start()
    try:
        cpu = paced(feed)
        feed.drain(120)
        with_store = time.process_time() - cpu
    finally:
        feed.close()
        store.close()
        gc.unfreeze()
        shutil.rmtree(workdir, ignore_errors=True)
    bare: list[Any] = []
    cpu = paced(bare.append)
    without = time.process_time() - cpu
    return {"items": n, "store_us_per_item": with_store / n * 1e6,
            "list_us_per_item": without / n * 1e6}


if __name__ == "__main__" and sys.argv[1:] == ["feed"]:
    print(feed_cost(Path(tempfile.mkdtemp(prefix="pear-feed-"))))
