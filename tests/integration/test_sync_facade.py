"""The blocking facade, for scripts without asyncio, against a real mosquitto."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pear_mqtt import MarketInsight, NetworkConfig, SyncPearNetwork


def test_sync_facade_exchanges_and_syncs(
        make_config: Callable[..., NetworkConfig], insight: Callable[..., MarketInsight]) -> None:
    with SyncPearNetwork(make_config("globex")) as rx, \
            SyncPearNetwork(make_config("acme")) as tx:
        iid = tx.broadcast_market_insight(insight(category="script/made"))
        tx.flush(timeout=10)
        got: Any = rx.receive(timeout=10)
        state = rx.sync(timeout=10)
        assert tx.status().connected and rx.peers()
    assert got.item_id == iid and got.insight.category == "script/made"
    assert [r.insight.category for r in state] == ["script/made"]
