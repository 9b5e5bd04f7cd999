"""The market store on real brokers: what each mode discloses is what a receiver can query,
a restart keeps it, forged items never enter, public nodes hold aggregates only, and the
store stays within its size cap under a long stream."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from bridgekit import Clock, Input, Net, close_window, insight, publish, wait, yesterday
from brokers import MosquittoBroker, NetworkPKI, probe

from pear_mqtt.bridge.service import Bridge
from pear_mqtt.config.models import MarketConfig, NetworkConfig
from pear_mqtt.errors import MarketError
from pear_mqtt.market import MarketStore
from pear_mqtt.model.insight import MarketInsight, NetworkMode
from pear_mqtt.model.topics import TopicScheme
from pear_mqtt.node.network import PearNetwork
from pear_mqtt.privacy.ranges import ValueRange


class _StuckWriter:
    """Holds a receiver's market writer in its first batch until the test sets ``gate``
    (``entered`` tells that it got there)."""

    def __init__(self) -> None:
        self.entered, self.gate = threading.Event(), threading.Event()

    def install(self, rx: PearNetwork, monkeypatch: pytest.MonkeyPatch) -> None:
        store = rx.market
        add_rows = store.add_rows

        def stuck(*args: Any, **kwargs: Any) -> int:
            self.entered.set()
            assert self.gate.wait(30)  # the writer waits for the test
            return add_rows(*args, **kwargs)

        monkeypatch.setattr(store, "add_rows", stuck)


def _with_store(config: NetworkConfig, path: Path, **market: Any) -> NetworkConfig:
    return config.model_copy(update={"market": MarketConfig(path=path, **market)})


async def test_private_mode_keeps_exact_values_queryable_across_a_restart(
        make_config: Callable[..., NetworkConfig], tmp_path: Path,
        insight: Callable[..., MarketInsight], take: Callable[..., Awaitable[list[Any]]]) -> None:
    path = tmp_path / "rx.market.db"
    rx_config = _with_store(make_config("acme", mode=NetworkMode.PRIVATE, node="hq"), path)
    prices = [1.0 + i for i in range(20)]
    async with PearNetwork(rx_config) as rx:
        stream = rx.insights()
        async with PearNetwork(make_config("acme", mode=NetworkMode.PRIVATE)) as tx:
            sent = await tx.broadcast_many([insight(product=f"p{i}", price=p)
                                            for i, p in enumerate(prices)])
            await take(stream, len(sent))
        await rx.market_settled()
        page = rx.market.query(category="grocery", limit=15)
        rest = rx.market.query(category="grocery", limit=15, cursor=page.next_cursor)
        days = rx.market.query(category="grocery/dairy", group_by="day", metric="price")
        position = rx.market.price_position("grocery/dairy", 10.5)
        status = rx.status()
    rows = page.rows + rest.rows
    assert len(page.rows) == 15 and rest.next_cursor is None
    assert sorted(r.values["price"] for r in rows) == prices  # exact, as sent
    assert {r.member for r in rows} == {"acme"} and {r.item_id for r in rows} == set(sent)
    assert [(d.count, d.exact, d.mean) for d in days] == [(20, True, pytest.approx(10.5))]
    assert position.basis == "exact" and position.percentile_low == 50.0
    assert position.observations == 20 and position.companies == 1
    assert status.market_rows == 20 and status.market_bytes > 0
    # A restart loses nothing: the file alone answers the same query.
    with MarketStore.open(path) as store:
        again = store.query(category="grocery/dairy", limit=100).rows
    assert [(r.id, r.values) for r in again] == [(r.id, r.values) for r in rows]


async def test_consortium_rows_keep_buckets_and_pseudonyms_and_so_do_exports(
        make_config: Callable[..., NetworkConfig], tmp_path: Path,
        insight: Callable[..., MarketInsight], take: Callable[..., Awaitable[list[Any]]]) -> None:
    path = tmp_path / "rx.market.db"
    async with PearNetwork(_with_store(make_config("globex"), path)) as rx:
        stream = rx.insights()
        async with PearNetwork(make_config("acme", pseudonymous=True)) as tx:
            await tx.broadcast_many([insight(product=f"p{i}", price=2.0 + i / 10)
                                     for i in range(12)])
            got = await take(stream, 12)
        await rx.market_settled()
        rows = rx.market.query(category="grocery/dairy").rows
        position = rx.market.price_position("grocery/dairy", 2.5)
        csv_path, parquet_path = tmp_path / "rows.csv", tmp_path / "rows.parquet"
        n = rx.market.export(csv_path, fmt="csv")
        rx.market.export(parquet_path, fmt="parquet")
    pseudonym = got[0].member
    assert pseudonym != "acme" and {r.member for r in rows} == {pseudonym}
    # Price as buckets, sales sealed for the aggregator (not stored), the direction shared
    # with the price; the price change is not (a change needs an exact price).
    assert all(isinstance(r.values["price"], ValueRange) for r in rows)
    assert all(not {"units", "revenue", "price_change_pct"} & r.values.keys() for r in rows)
    assert {r.direction for r in rows} == {"up"}
    assert position.basis == "ranges" and position.observations == 12
    assert position.percentile_low <= position.percentile_high
    text = csv_path.read_text()
    assert n == 12 and "acme" not in text and pseudonym in text
    assert parquet_path.stat().st_size > 0


async def test_a_forged_insight_never_enters_the_store(
        make_config: Callable[..., NetworkConfig], mosquitto: MosquittoBroker,
        pki: NetworkPKI, tmp_path: Path, insight: Callable[..., MarketInsight],
        take: Callable[..., Awaitable[list[Any]]]) -> None:
    rx_config = _with_store(make_config("acme", mode=NetworkMode.PRIVATE, node="hq"),
                            tmp_path / "rx.market.db")
    topic = TopicScheme("private", pki.network, "acme").insights("grocery/dairy")
    async with PearNetwork(rx_config) as rx:
        stream = rx.insights()
        with probe(mosquitto, pki.node("acme", "spy"), subscribe=[topic]) as spy:
            async with PearNetwork(make_config("acme", mode=NetworkMode.PRIVATE)) as tx:
                await tx.broadcast_market_insight(insight(product="real", price=2.0))
                await take(stream, 1)
                wire, _ = spy.expect(topic, timeout=20)
                # The same envelope with its body altered: the signature no longer holds.
                envelope = json.loads(wire.payload)
                field = "enc" if "enc" in envelope else "body"  # sealed, or signed in clear
                body = envelope[field]
                for change in ("A", "B"):
                    envelope[field] = (body[:20] + change + body[21:] if isinstance(body, str)
                                       else {**body, "items": []})
                    spy.publish(topic, json.dumps(envelope).encode())
                await tx.broadcast_market_insight(insight(product="after", price=3.0))
                await take(stream, 1)
        await rx.market_settled()
        rows = rx.market.query().rows
        dropped = rx.status().dropped
    assert sorted(r.product_id or "" for r in rows) == ["after", "real"]
    assert [r.values["price"] for r in rows] == [2.0, 3.0]
    assert sum(dropped.values()) >= 2


async def test_the_store_stays_within_its_cap_under_a_long_stream(
        make_config: Callable[..., NetworkConfig], tmp_path: Path,
        insight: Callable[..., MarketInsight], take: Callable[..., Awaitable[list[Any]]]) -> None:
    cap = 1024 * 1024
    rx_config = _with_store(make_config("acme", mode=NetworkMode.PRIVATE, node="hq"),
                            tmp_path / "rx.market.db", max_bytes=cap)
    sizes: list[int] = []
    async with PearNetwork(rx_config) as rx:
        stream = rx.insights()
        async with PearNetwork(make_config("acme", mode=NetworkMode.PRIVATE)) as tx:
            for chunk in range(12):
                await tx.broadcast_many([insight(product=f"c{chunk}-{i}")
                                         for i in range(1000)])
                await take(stream, 1000, timeout=60)
                await rx.market_settled()
                sizes.append(rx.status().market_bytes)
        newest = rx.market.query(category="grocery", limit=1, cursor=None)
        status = rx.status()
    assert max(sizes) <= cap, sizes
    assert 0 < status.market_rows < 12_000  # the oldest went, the newest stayed
    assert newest.rows and rx_config.market.max_bytes == cap


async def test_a_public_node_holds_only_the_bridges_aggregates(net: Net, tmp_path: Path) -> None:
    start = yesterday()
    inputs = [Input(company=f"c{n}", store="store-1",
                    insight=insight("grocery/dairy", start=start, price=1.5 + n,
                                    units=100.0 + n)) for n in range(6)]
    clock = Clock()
    path = tmp_path / "public.market.db"
    reader = _with_store(net.node_config(net.member("reader"), mode=NetworkMode.PUBLIC), path)
    async with PearNetwork(reader) as public:
        aggregates = public.aggregates()
        async with Bridge(net.bridge_config(), clock=clock) as bridge:
            await publish(net, inputs)
            await wait(bridge, lambda s: s.items_counted >= len(inputs))
            await close_window(bridge, clock)
        first = await asyncio.wait_for(anext(aggregates), 30)
        await public.market_settled()
        cells = public.market.aggregates("grocery/dairy")
        series = public.market.history("grocery/dairy", "units")
        position = public.market.price_position("grocery/dairy", 3.0)
        rows = public.market.query().rows
    assert first.aggregate.category == "grocery/dairy"
    assert rows == []  # no individual insight reaches a public node
    units = [c for c in cells if c.field == "units"]
    assert units and units[0].companies == 6
    assert units[0].mean == pytest.approx(sum(100.0 + n for n in range(6)) / 6)
    assert [p.mean for p in series] == [units[0].mean]
    assert position.basis == "aggregate" and position.companies >= 5
    stored = json.dumps([c.region for c in cells])
    assert all(net.member(f"c{n}") not in stored for n in range(6))


def test_a_store_refuses_another_network_and_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    MarketStore.open(path, network="n1", mode="consortium").close()
    with pytest.raises(MarketError, match="one store per network"):
        MarketStore.open(path, network="n2", mode="consortium")
    with pytest.raises(MarketError, match="no such file"):
        MarketStore.open(tmp_path / "absent.db")


async def test_a_full_disk_holds_the_rows_in_memory_says_so_and_loses_none(
        make_config: Callable[..., NetworkConfig], small_disk: Path,
        insight: Callable[..., MarketInsight], take: Callable[..., Awaitable[list[Any]]]
        ) -> None:
    rx_config = _with_store(make_config("acme", mode=NetworkMode.PRIVATE, node="hq"),
                            small_disk / "rx.market.db")
    filler = small_disk / "filler"
    async with PearNetwork(rx_config) as rx:
        stream = rx.insights()
        with filler.open("wb") as f:  # the disk fills up under a running node
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        async with PearNetwork(make_config("acme", mode=NetworkMode.PRIVATE)) as tx:
            sent = await tx.broadcast_many([insight(product=f"p{i}", price=1.0 + i)
                                            for i in range(300)])
            await take(stream, len(sent))
        with pytest.raises(TimeoutError):
            await rx.market_settled(timeout=3)  # it cannot write: nothing is settled
        full = rx.status()
        filler.unlink()
        await rx.market_settled(timeout=30)  # the next retry writes them all
        after = rx.status()
        rows = rx.market.query(limit=1000).rows
    assert full.market_failing is not None and "full" in full.market_failing
    assert str(small_disk / "rx.market.db") in full.market_failing
    assert full.health.value == "degraded" and full.market_backlog == len(sent)
    assert after.market_failing is None and after.health.value == "ok"
    assert after.market_backlog == 0 and after.market_dropped == 0
    assert {r.item_id for r in rows} == set(sent)


async def test_a_store_far_behind_stops_the_node_reading_and_loses_nothing(
        make_config: Callable[..., NetworkConfig], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, insight: Callable[..., MarketInsight],
        take: Callable[..., Awaitable[list[Any]]]) -> None:
    from pear_mqtt.market import feed as feed_module

    # The writer is stuck on its first 20 rows while 380 more come: past 100 waiting, the
    # oldest would go. A node that stops reading at 40 keeps them all (the broker holds
    # the rest), and reads on once the writer catches up.
    monkeypatch.setattr(feed_module, "BACKLOG_MAX", 100)
    monkeypatch.setattr(feed_module, "HOLD_AT", 40)
    monkeypatch.setattr(feed_module, "RELEASE_AT", 5)
    rx_config = _with_store(make_config("acme", mode=NetworkMode.PRIVATE, node="hq"),
                            tmp_path / "rx.market.db")
    writer = _StuckWriter()
    entered, gate = writer.entered, writer.gate
    async with PearNetwork(rx_config) as rx:
        stream = rx.insights()
        writer.install(rx, monkeypatch)
        sent: list[str] = []
        async with PearNetwork(make_config("acme", mode=NetworkMode.PRIVATE)) as tx:
            for r in range(20):
                sent += await tx.broadcast_many([insight(product=f"r{r}p{i}", price=1.0 + i)
                                                 for i in range(20)])
                await tx.flush(timeout=10)
                if r == 0:  # the writer holds the first round before the rest is sent
                    assert await asyncio.to_thread(entered.wait, 10)
        held = rx.status()
        gate.set()
        await take(stream, len(sent))
        await rx.market_settled(timeout=30)
        after = rx.status()
        rows = rx.market.query(limit=1000).rows
    assert held.insights_in < len(sent)  # the broker kept the rest while the node held
    assert after.market_dropped == 0 and after.market_backlog == 0
    assert {r.item_id for r in rows} == set(sent)


async def test_a_hold_on_reading_ends_by_itself_while_the_writer_stays_stuck(
        make_config: Callable[..., NetworkConfig], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, insight: Callable[..., MarketInsight],
        take: Callable[..., Awaitable[list[Any]]], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="pear_mqtt.market.feed")
    from pear_mqtt.market import feed as feed_module

    # A connection must answer its pings: after HOLD_MAX it reads again even though the
    # writer has not moved (every insight reaches the stream while the store is stuck).
    monkeypatch.setattr(feed_module, "HOLD_AT", 40)
    monkeypatch.setattr(feed_module, "RELEASE_AT", 5)
    monkeypatch.setattr(feed_module, "HOLD_MAX", 0.5)
    rx_config = _with_store(make_config("acme", mode=NetworkMode.PRIVATE, node="hq"),
                            tmp_path / "rx.market.db")
    writer = _StuckWriter()
    entered, gate = writer.entered, writer.gate
    async with PearNetwork(rx_config) as rx:
        stream = rx.insights()
        writer.install(rx, monkeypatch)
        async with PearNetwork(make_config("acme", mode=NetworkMode.PRIVATE)) as tx:
            sent = await tx.broadcast_many([insight(product=f"a{i}") for i in range(20)])
            await tx.flush(timeout=10)
            assert await asyncio.to_thread(entered.wait, 10)
            for r in range(10):  # an envelope each: the node reads them one after another
                sent += await tx.broadcast_many([insight(product=f"r{r}p{i}")
                                                 for i in range(20)])
                await tx.flush(timeout=10)
            got = await take(stream, len(sent))  # only a pause that ended lets these in
        try:
            assert {g.item_id for g in got} == set(sent)
            assert not gate.is_set() and "the node stops reading" in caplog.text
        finally:
            gate.set()
        await rx.market_settled(timeout=30)
        assert rx.status().market_dropped == 0
