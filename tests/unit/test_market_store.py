"""The market store on its own (SQLite on disk, no broker): duplicates and newer versions,
day and week groups, positions, retention by age, live reads, and the ``pear-mqtt market``
commands over a store file."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import struct
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pear_mqtt.cli.main import main
from pear_mqtt.errors import MarketError
from pear_mqtt.market import MarketStore, Retention
from pear_mqtt.market.schema import PAGE_SIZE
from pear_mqtt.model.aggregates import AggregateBody
from pear_mqtt.node.records import ReceivedAggregate, ReceivedInsight
from pear_mqtt.privacy.filter import SharedInsight
from pear_mqtt.privacy.ranges import ValueRange

T0 = datetime(2026, 11, 2, tzinfo=UTC)  # a Monday


def received(*, member: str = "acme", node: str = "s1", iid: str = "i1", price: Any = 2.0,
             day: int = 0, seq: int = 1, category: str = "grocery/dairy",
             region: str = "north", hours: int = 0) -> ReceivedInsight:
    start = T0 + timedelta(days=day, hours=hours)
    exact = not isinstance(price, dict)
    shared = SharedInsight.model_validate({
        "category": category, "region": region, "window_start": start,
        "window_end": start + timedelta(hours=1), "company": member, "store": node,
        "levels": {"price_data": "full" if exact else "ranges_only"},
        "groups": {"price_data": {"currency": "EUR", "price": price}}})
    return ReceivedInsight(item_id=iid, topic="t", member=member, node=node, insight=shared,
                           retained=False, received_at=start.timestamp() + 7200,
                           sequence=seq)


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with MarketStore.open(tmp_path / "m.db", network="net", mode="private") as s:
        yield s


def test_a_duplicate_is_stored_once_and_a_newer_version_replaces_the_older(
        store: MarketStore) -> None:
    assert store.add([received(price=2.0, seq=5), received(price=2.0, seq=5)]) == 1
    assert store.add([received(price=9.0, seq=3)]) == 0  # older: ignored
    store.add([received(price=3.0, seq=7)])  # newer: replaces, and the roll-up follows
    rows = store.query().rows
    assert [(r.values["price"], r.item_id) for r in rows] == [(3.0, "i1")]
    day = store.query(group_by="day", metric="price")
    assert [(d.count, d.mean, d.low, d.high) for d in day] == [(1, 3.0, 3.0, 3.0)]


def test_an_item_twice_in_one_batch_keeps_its_newest_version_whichever_comes_first(
        store: MarketStore) -> None:
    assert store.add([received(price=3.0, seq=7), received(price=9.0, seq=5),
                      received(iid="i2", price=1.0, seq=1), received(iid="i2", price=4.0,
                                                                    seq=2)]) == 2
    assert {r.item_id: r.values["price"] for r in store.query().rows} == {"i1": 3.0, "i2": 4.0}
    day = store.query(group_by="day", metric="price")
    assert [(d.count, d.mean) for d in day] == [(2, 3.5)]


def test_the_latest_row_of_a_sender_is_its_newest_window_within_and_across_batches(
        store: MarketStore) -> None:
    store.add([received(iid="new", price=5.0, day=3), received(iid="old", price=1.0, day=1),
               received(member="globex", iid="g", price=2.0, day=2)])
    store.add([received(iid="older", price=7.0, day=0)])  # arrives later, ends earlier
    latest = {r.member: (r.item_id, r.values["price"]) for r in store.latest("grocery/dairy")}
    assert latest == {"acme": ("new", 5.0), "globex": ("g", 2.0)}
    assert store.price_position("grocery/dairy", 3.0).companies == 2


def test_of_equal_windows_the_later_arrival_is_the_latest_within_and_across_batches(
        store: MarketStore) -> None:
    store.add([received(iid="a", price=1.0, day=2), received(iid="b", price=2.0, day=2),
               received(iid="c", price=3.0, day=1)])
    assert [r.item_id for r in store.latest("grocery/dairy")] == ["b"]
    store.add([received(iid="d", price=4.0, day=2), received(iid="e", price=5.0, day=1)])
    assert [r.item_id for r in store.latest("grocery/dairy")] == ["d"]


def test_a_new_store_has_the_store_page_size_and_an_old_one_keeps_its_own(
        tmp_path: Path) -> None:
    old = tmp_path / "old.db"
    conn = sqlite3.connect(old)
    conn.execute("PRAGMA page_size = 4096")
    conn.execute("CREATE TABLE t (x)")  # the page size is fixed once the file holds a table
    conn.close()
    for path, size in ((tmp_path / "new.db", PAGE_SIZE), (old, 4096)):
        with MarketStore.open(path, network="net", mode="private") as s:
            s.add([received()])
            assert [r.item_id for r in s.query().rows] == ["i1"]
            conn = sqlite3.connect(path)
            assert conn.execute("PRAGMA page_size").fetchone()[0] == size
            assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == (2 if size ==
                                                                        PAGE_SIZE else 0)
            conn.close()


def test_a_store_with_former_indexes_reads_and_loses_them_when_written(
        tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    with MarketStore.open(path, network="net", mode="private") as s:
        s.add([received()])
    conn = sqlite3.connect(path)
    conn.execute("CREATE INDEX insights_category_day ON insights (category, day)")
    conn.execute("CREATE INDEX insights_window_end ON insights (window_end)")
    conn.close()
    with MarketStore.open(path, readonly=True) as ro:  # cannot drop it: reads all the same
        assert [r.item_id for r in ro.query(category="grocery").rows] == ["i1"]
    with MarketStore.open(path, network="net", mode="private") as s:
        assert s.add([received(iid="i2", day=1)]) == 1
    conn = sqlite3.connect(path)
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    conn.close()
    assert indexes & {"insights_category_day", "insights_window_end"} == set()
    assert "insights_day_key" in indexes


def test_a_store_of_schema_1_is_upgraded_when_opened_for_writing(tmp_path: Path) -> None:
    # Schema 1 packed the figures as a 32-bit mask of the bounds present (two bits per
    # metric, price first), then those bounds as little-endian doubles.
    path = tmp_path / "m.db"
    prices: list[Any] = [2.5, {"lo": 1.0, "hi": 2.0}, {"lo": 4.0}]
    with MarketStore.open(path, network="net", mode="private") as s:
        s.add([received(iid=f"i{k}", price=p) for k, p in enumerate(prices)])
        before = (s.query().rows, s.query(group_by="day", metric="price"))
    packed = [struct.pack("<I2d", 3, 2.5, 2.5), struct.pack("<I2d", 3, 1.0, 2.0),
              struct.pack("<Id", 1, 4.0)]
    with sqlite3.connect(path) as conn:
        for k, blob in enumerate(packed):
            conn.execute("UPDATE insights SET vals = ? WHERE item_id = ?", (blob, f"i{k}"))
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
    conn.close()
    with pytest.raises(MarketError, match=r"schema 1.*open it once for writing"):
        MarketStore.open(path, readonly=True)
    with MarketStore.open(path, network="net", mode="private") as s:
        assert (s.query().rows, s.query(group_by="day", metric="price")) == before
        s.add([received(iid="i3", price=3.0)])  # the roll-up goes on from the upgraded rows
        assert s.query(group_by="day", metric="price")[0].count == 4
    with MarketStore.open(path, readonly=True) as ro:
        assert [r.values["price"] for r in ro.query().rows][:3] == [
            2.5, ValueRange(lo=1.0, hi=2.0), ValueRange(lo=4.0, hi=None)]


def test_groups_by_day_and_week_count_companies_and_bounds(store: MarketStore) -> None:
    items = [received(member=m, iid=f"{m}{d}", price=p + d, day=d)
             for d in range(10) for m, p in (("acme", 1.0), ("globex", 3.0))]
    store.add(items)
    days = store.query(category="grocery", group_by="day", metric="price")
    assert len(days) == 10 and all(d.companies == 2 and d.count == 2 for d in days)
    assert days[0].mean == pytest.approx(2.0) and days[0].low == 1.0 and days[0].high == 3.0
    weeks = store.query(category="grocery", group_by="week", metric="price")
    assert [w.period for w in weeks] == [T0, T0 + timedelta(days=7)]
    assert [w.count for w in weeks] == [14, 6]
    since = store.query(group_by="day", since=T0 + timedelta(days=8))
    assert [d.period for d in since] == [T0 + timedelta(days=8), T0 + timedelta(days=9)]
    with pytest.raises(MarketError, match="unknown metric"):
        store.query(group_by="day", metric="nope")
    with pytest.raises(MarketError, match="timezone-aware"):
        store.query(since=datetime(2026, 1, 1))


def test_ranges_give_a_percentile_band_and_history_a_series(store: MarketStore) -> None:
    store.add([received(member=f"m{i}", iid=f"x{i}", price={"lo": 1.0 + i, "hi": 2.0 + i})
               for i in range(4)])
    pos = store.price_position("grocery/dairy", 2.5)
    # [1,2) is below; [2,3) holds 2.5; [3,4) and [4,5) are above.
    assert (pos.basis, pos.percentile_low, pos.percentile_high) == ("ranges", 25.0, 50.0)
    assert pos.companies == 4 and pos.mean == pytest.approx(3.0)
    rows = store.latest("grocery")
    assert all(isinstance(r.values["price"], ValueRange) for r in rows) and len(rows) == 4
    with pytest.raises(MarketError, match="no prices"):
        store.price_position("toys", 1.0)


def test_public_aggregates_answer_position_and_history(store: MarketStore) -> None:
    body = AggregateBody.model_validate({
        "network": "net", "category": "grocery/dairy", "window_start": T0,
        "window_end": T0 + timedelta(days=1), "policy_version": "v", "min_companies": 5,
        "dominance_cap": 0.25, "cells": [{"region": "north", "groups": [{
            "group": "price_data", "currency": "EUR",
            "fields": {"price": {"count": 6, "companies": 6, "mean": 2.0, "stddev": 0.5}}}]}]})
    agg = ReceivedAggregate(topic="a", aggregate=body, retained=True, received_at=1.0)
    assert store.add([agg, agg]) == 1
    pos = store.price_position("grocery/dairy", 2.5)
    assert pos.basis == "aggregate" and pos.companies == 6 and pos.z_score == pytest.approx(1)
    assert pos.percentile_low == pytest.approx(84.13, abs=0.01)
    assert [p.mean for p in store.history("grocery/dairy", "price")] == [2.0]


def test_retention_by_age_drops_old_windows_and_their_days(tmp_path: Path) -> None:
    now = (T0 + timedelta(days=10)).timestamp()
    with MarketStore.open(tmp_path / "m.db", network="n", mode="private",
                          retention=Retention(max_age_seconds=3 * 86400)) as store:
        store.add([received(iid=f"i{d}", day=d) for d in range(10)], now=now)
        kept = store.query().rows
        days = store.query(group_by="day")
        status = store.status()
    assert sorted(r.item_id for r in kept) == ["i7", "i8", "i9"]
    assert [d.period.day for d in days] == [9, 10, 11]
    assert status.insights == 3 and status.oldest is not None


def test_time_bounds_keep_exactly_the_windows_ending_between_them(store: MarketStore) -> None:
    # Windows of one hour from 00:00 to 06:00 on two days: the bounds cut inside a day.
    store.add([received(iid=f"d{d}h{h}", day=d, hours=h) for d in (0, 1) for h in range(6)])
    since, until = T0 + timedelta(hours=3), T0 + timedelta(days=1, hours=2)
    got = sorted(r.item_id for r in store.query(since=since, until=until).rows)
    assert got == ["d0h2", "d0h3", "d0h4", "d0h5", "d1h0", "d1h1"]
    assert all(since <= r.window_end <= until for r in store.query(since=since,
                                                                   until=until).rows)


def test_the_size_cap_drops_the_oldest_windows_first(tmp_path: Path) -> None:
    cap = 400_000
    with MarketStore.open(tmp_path / "m.db", network="n", mode="private",
                          retention=Retention(max_bytes=cap)) as store:
        for d in range(30):  # a day at a time, newest last
            store.add([received(iid=f"d{d:02d}-{i}", day=d, hours=i % 20) for i in range(200)],
                      now=(T0 + timedelta(days=d + 1)).timestamp())
        kept = store.query(group_by="day")
        status = store.status()
    assert 0 < status.bytes <= cap
    days = [g.period for g in kept]
    assert days == [T0 + timedelta(days=k) for k in range(30 - len(days), 30)]  # the newest
    assert status.oldest is not None and status.oldest >= days[0]
    assert 0 < status.insights < 30 * 200


async def test_watch_yields_rows_as_they_are_stored(store: MarketStore) -> None:
    store.add([received(iid="before")])
    start = store.query().rows[-1].id  # watched from here, whenever the task gets to run
    seen: list[str] = []

    async def follow() -> None:
        async for row in store.watch(category="grocery", cursor=start):
            seen.append(row.item_id)
            if len(seen) == 2:
                return

    task = asyncio.create_task(follow())
    await asyncio.to_thread(store.add, [received(iid="a"), received(iid="b", category="toys"),
                                        received(iid="c")])
    await asyncio.wait_for(task, 5)
    assert seen == ["a", "c"]


def test_the_cli_prints_tables_json_csv_and_exports(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.db"
    with MarketStore.open(path, network="net", mode="private") as store:
        store.add([received(member=f"m{i}", iid=f"i{i}", price=1.0 + i) for i in range(5)])
    assert main(["market", "query", "--store", str(path), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["price"] for r in rows] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert main(["market", "query", "--store", str(path), "--group-by", "day", "--csv"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("period,metric,count") and ",price,5,5," in out[1]
    assert main(["market", "position", "grocery/dairy", "3.5", "--store", str(path)]) == 0
    assert "60th percentile" in capsys.readouterr().out
    assert main(["market", "query", "--store", str(path), "--limit", "2"]) == 0
    captured = capsys.readouterr()
    assert "m0" in captured.out and "--cursor" in captured.err
    assert main(["market", "export", str(tmp_path / "o.csv"), "--store", str(path)]) == 0
    assert (tmp_path / "o.csv").read_text().count("\n") == 6
    assert main(["market", "status", "--store", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["insights"] == 5
    assert main(["market", "query", "--store", str(tmp_path / "none.db")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_logged_item_enters_only_once_a_signed_head_proves_its_entry(
        store: MarketStore) -> None:
    from dataclasses import replace

    from pear_mqtt.market import MarketFeed
    from pear_mqtt.security.identity import Identity

    feed = MarketFeed(store)
    feed.start()
    try:
        acme = Identity(network="net", member="acme", node="s1")
        for i in range(3):
            feed(replace(received(iid=f"i{i}"), log_ref=f"L1:{i}"))
        feed(replace(received(member="evil", iid="x"), log_ref="L9:0"))  # never proven
        assert feed.drain(5) and store.query().rows == [] and feed.waiting == 4
        feed.proven(acme, "L1", 2)  # a head of length 2: entries 0 and 1
        assert feed.drain(5)
        assert sorted(r.item_id for r in store.query().rows) == ["i0", "i1"]
        feed.proven(acme, "L1", 3)
        feed(replace(received(iid="i3"), log_ref="L1:2"))  # already proven: at once
        assert feed.drain(5)
        assert sorted(r.item_id for r in store.query().rows) == ["i0", "i1", "i2", "i3"]
        assert feed.waiting == 1  # the unproven sender's item is still out
    finally:
        feed.close()


def test_drain_does_not_wait_out_the_feeds_linger(store: MarketStore,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from pear_mqtt.market import MarketFeed
    from pear_mqtt.market import feed as feed_module

    # A linger longer than drain's timeout: only a drain that cuts it short returns True.
    monkeypatch.setattr(feed_module, "LINGER", 60.0)
    feed = MarketFeed(store)
    feed.start()
    try:
        feed(received(iid="a"))
        assert feed.drain(5)
        feed(received(iid="b"))  # the writer lingers again after a drain
        assert feed.drain(5)
        assert sorted(r.item_id for r in store.query().rows) == ["a", "b"]
    finally:
        feed.close(5)


def test_the_feed_outlives_an_unexpected_error_and_loses_nothing(
        store: MarketStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from pear_mqtt.market import MarketFeed

    real, calls = store.add_rows, []

    def flaky(*args: Any, **kwargs: Any) -> int:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "add_rows", flaky)
    feed = MarketFeed(store)
    feed.start()
    try:
        for i in range(3):
            feed(received(iid=f"i{i}"))
        assert feed.drain(10)  # the retry comes 2 s later
        assert len(store.query().rows) == 3
        assert feed.failing is None and feed.dropped == 0 and len(calls) >= 2
    finally:
        feed.close(5)


@pytest.mark.skipif(sys.platform != "linux", reason="nice is per thread on Linux only")
def test_the_writer_thread_runs_nicer_than_the_receiver(store: MarketStore) -> None:
    from pear_mqtt.market import MarketFeed
    from pear_mqtt.market.feed import WRITER_NICE

    def nice(tid: int) -> int:  # field 19 of /proc/<pid>/task/<tid>/stat
        stat = Path(f"/proc/self/task/{tid}/stat").read_text(encoding="ascii")
        return int(stat.rsplit(")", 1)[1].split()[16])

    feed = MarketFeed(store)
    feed.start()
    try:
        feed(received(iid="a"))
        assert feed.drain(5)
        writer = next(t for t in threading.enumerate() if t.name == "pear-market")
        assert writer.native_id is not None
        assert nice(writer.native_id) == min(19, nice(threading.get_native_id()) + WRITER_NICE)
    finally:
        feed.close(5)


def test_an_item_the_feed_cannot_read_is_counted_and_the_receiver_goes_on(
        store: MarketStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from pear_mqtt.market import MarketFeed

    real = store.row

    def buggy(item: ReceivedInsight) -> Any:
        if item.item_id == "bad":
            raise RuntimeError("a bug")
        return real(item)

    monkeypatch.setattr(store, "row", buggy)
    feed = MarketFeed(store)
    feed.start()
    try:
        for iid in ("a", "bad", "b"):
            feed(received(iid=iid))  # raises nothing into the caller
        assert feed.drain(5)
        assert sorted(r.item_id for r in store.query().rows) == ["a", "b"]
        assert feed.dropped == 1
    finally:
        feed.close(5)


def test_a_feed_far_behind_asks_to_stop_reading_and_to_read_again_once_caught_up(
        store: MarketStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from pear_mqtt.market import MarketFeed
    from pear_mqtt.market import feed as feed_module

    monkeypatch.setattr(feed_module, "HOLD_AT", 5)
    monkeypatch.setattr(feed_module, "RELEASE_AT", 1)
    calls: list[bool] = []
    feed = MarketFeed(store)  # not started: nothing is written yet
    feed.on_hold = calls.append
    for i in range(8):
        feed(received(iid=f"i{i}"))
    assert calls == [True] and feed.holds == 1  # asked once, not once per item
    feed.start()
    try:
        assert feed.drain(5)
        assert calls == [True, False]
        assert len(store.query().rows) == 8
    finally:
        feed.close(5)


def test_a_writer_far_behind_keeps_the_newest_items_and_counts_the_rest(
        store: MarketStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from pear_mqtt.market import MarketFeed
    from pear_mqtt.market import feed as feed_module

    monkeypatch.setattr(feed_module, "BACKLOG_MAX", 10)
    feed = MarketFeed(store)  # not started: nothing is written
    for i in range(25):
        feed(received(iid=f"i{i:02d}"))
    assert feed.backlog <= 10 and feed.backlog + feed.dropped == 25
    feed.start()
    try:
        assert feed.drain(5)
        kept = sorted(r.item_id for r in store.query().rows)
        assert len(kept) == 25 - feed.dropped
        assert kept[-1] == "i24" and "i00" not in kept  # the oldest went
    finally:
        feed.close(5)


def test_a_batch_groups_as_the_same_rows_added_one_at_a_time(tmp_path: Path) -> None:
    # Repeated figures (one member's and several members'), buckets, open buckets and exact
    # values in one day: the roll-up of one batch (its rows counted per distinct figures
    # first, as they repeat) equals that of one row per batch.
    prices: list[Any] = [2.0, 2.0, 2.0, 3.5, {"lo": 1.0, "hi": 2.0}, {"lo": 1.0, "hi": 2.0},
                         {"lo": 4.0}, {"hi": 0.5}, {"lo": 4.0}]
    items = [received(member=f"m{k % 3}", iid=f"i{k}-{c}", price=p, day=k % 2)
             for c in range(3) for k, p in enumerate(prices)]
    groups = []
    for name, batches in (("one", [items]), ("each", [[i] for i in items])):
        with MarketStore.open(tmp_path / f"{name}.db", network="net", mode="private") as s:
            for batch in batches:
                s.add(batch)
            groups.append(s.query(category="grocery", group_by="day", metric="price"))
    assert len(groups[0]) == 2 and groups[0] == groups[1]
    first = groups[0][0]
    # Day 0: 2.0, 2.0 (exact), bucket 1-2 (mid 1.5), open bucket from 4 (counts at 4), 4 again.
    assert (first.count, first.companies, first.exact) == (15, 3, False)
    assert first.mean == pytest.approx((2.0 + 2.0 + 1.5 + 4.0 + 4.0) / 5)
    assert (first.low, first.high) == (1.0, 4.0)


def test_a_large_batch_is_stored_whole_in_arrival_order(store: MarketStore) -> None:
    # More rows than one multi-row insert takes, and a remainder: every row once, in order.
    items = [received(member=f"m{k % 7}", iid=f"i{k}", price=1.0 + k % 13, day=k % 3)
             for k in range(600)]
    assert store.add(items) == 600
    rows = store.query(limit=1000).rows
    assert [r.item_id for r in rows] == [f"i{k}" for k in range(600)]
    assert [r.values["price"] for r in rows] == [1.0 + k % 13 for k in range(600)]
    assert sum(d.count for d in store.query(group_by="day", metric="price")) == 600
    assert store.add(items[:300]) == 0


def test_a_store_whose_row_ids_are_used_up_refuses_new_rows_whole(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    with MarketStore.open(path, network="net", mode="private") as store:
        store.add([received(iid="first")])
        with sqlite3.connect(path) as other:  # as if 2**63 - 1 rows had been stored
            other.execute("UPDATE insights SET id = 9223372036854775807")
        with pytest.raises(MarketError, match=r"row ids are used up.*start a new store"):
            store.add([received(iid="a"), received(iid="b", member="globex")])
        assert [r.item_id for r in store.query().rows] == ["first"]
