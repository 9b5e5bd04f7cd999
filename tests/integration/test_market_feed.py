"""The market store's live feed on a disk that fills up: the rows wait in memory, the
refusal is said once, and everything is written when space returns (docs/MARKET.md)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pear_mqtt.market import MarketFeed, MarketStore
from pear_mqtt.node.records import ReceivedInsight
from pear_mqtt.privacy.filter import SharedInsight

T0 = datetime(2026, 11, 2, tzinfo=UTC)


def _items(n: int, *, first: int = 0) -> list[ReceivedInsight]:
    out = []
    for k in range(first, first + n):
        start = T0 + timedelta(minutes=k % 600)
        shared = SharedInsight.model_validate({
            "category": f"cat{k % 8}", "region": "eu", "window_start": start,
            "window_end": start + timedelta(hours=1), "company": "acme", "store": "s1",
            "levels": {"price_data": "ranges_only"},
            "groups": {"price_data": {"currency": "EUR",
                                      "price": {"lo": float(k % 9), "hi": k % 9 + 1.0}}}})
        out.append(ReceivedInsight(item_id=f"i{k}", topic="t", member="acme", node="s1",
                                   insight=shared, retained=False,
                                   received_at=start.timestamp(), sequence=k))
    return out


def test_a_full_disk_keeps_the_rows_until_space_returns(small_disk: Path) -> None:
    with MarketStore.open(small_disk / "m.db", network="net", mode="consortium") as store:
        feed = MarketFeed(store)
        feed.start()
        filler = small_disk / "filler"
        try:
            with filler.open("wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass
            for item in _items(3000):
                feed(item)
            deadline = time.monotonic() + 30
            while feed.failing is None:  # the writer's refusal: polled, with a deadline
                assert time.monotonic() < deadline, "the full disk was never noticed"
                time.sleep(0.05)
            assert "full" in feed.failing and str(small_disk / "m.db") in feed.failing
            assert store.status().insights == 0
            filler.unlink()
            assert feed.drain(30), feed.failing
            assert feed.failing is None and feed.dropped == 0
            assert store.status().insights == 3000
        finally:
            feed.close()

