"""PearNetwork against the embedded amqtt broker (MQTT 3.1.1, same identity and ACL rules)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from brokers import GROUP_KEY, NetworkPKI, free_port

from pear_mqtt.config.models import (
    EncryptionConfig,
    NetworkConfig,
    PrivacyConfig,
    ReliabilityConfig,
)
from pear_mqtt.model.insight import MarketInsight, NetworkMode
from pear_mqtt.node.network import PearNetwork
from pear_mqtt.ops.embedded.broker import EmbeddedBroker
from pear_mqtt.privacy.ranges import ValueRange


@pytest.fixture
def make_config(pki: NetworkPKI, embedded: EmbeddedBroker) -> Callable[..., NetworkConfig]:
    def make(member: str, *, broker_url: str | None = None, outbox: Path | None = None,
             mqtt_version: str = "3.1.1") -> NetworkConfig:
        return NetworkConfig(
            mode=NetworkMode.CONSORTIUM, company_id=member, network_id=pki.network,
            node_id="store-1",
            broker_url=broker_url or f"mqtts://localhost:{embedded.tls_port}",
            tls=pki.tls(member), privacy=PrivacyConfig(),
            encryption=EncryptionConfig(keys={"k1": GROUP_KEY}, active="k1"),
            reliability=ReliabilityConfig(outbox_path=outbox, reconnect_min_delay=0.05,
                                          reconnect_max_delay=0.5,
                                          mqtt_version=mqtt_version))  # type: ignore[arg-type]
    return make


async def test_exchange_over_embedded_broker(
        make_config: Callable[..., NetworkConfig], insight: Callable[..., MarketInsight],
        take: Callable[..., Awaitable[list[Any]]]) -> None:
    # "auto" finds out by itself that amqtt does not speak MQTT 5.
    async with PearNetwork(make_config("globex")) as rx, \
            PearNetwork(make_config("acme", mqtt_version="auto")) as tx:
        stream = rx.insights()
        iid = await tx.broadcast_market_insight(insight())
        (got,) = await take(stream, 1)
        conn = tx.supervisor.connection
        assert conn is not None and conn.protocol == 4  # amqtt speaks 3.1.1 only
    assert got.item_id == iid and got.member == "acme"
    assert isinstance(got.insight.groups["price_data"]["price"], ValueRange)


async def test_sync_and_presence_over_embedded_broker(
        make_config: Callable[..., NetworkConfig], insight: Callable[..., MarketInsight]) -> None:
    n = 1000
    async with PearNetwork(make_config("acme")) as tx:
        for i in range(n):
            await tx.broadcast_market_insight(insight(category=f"cat/c{i:04d}"))
        await tx.flush(timeout=60)
        async with PearNetwork(make_config("globex")) as late:
            started = time.perf_counter()
            result = await late.sync(timeout=60)
            elapsed = time.perf_counter() - started
            await late.wait_peers(lambda ps: any(p.member == "acme" for p in ps), timeout=10)
            assert tx.supervisor.connection is not None
            tx.supervisor.crash()  # a crash: the will marks acme offline
            await late.wait_peers(lambda ps: not any(p.member == "acme" for p in ps),
                                  timeout=15)
    assert len(result) == n
    print(f"\nembedded: sync of {n} retained states in {elapsed:.2f} s")


async def test_outbox_zero_loss_over_embedded_broker(
        make_config: Callable[..., NetworkConfig], tmp_path: Path,
        insight: Callable[..., MarketInsight], take: Callable[..., Awaitable[list[Any]]]) -> None:
    outbox = tmp_path / "outbox.sqlite"
    async with PearNetwork(make_config("globex")) as rx:
        stream = rx.insights()
        offline = PearNetwork(make_config(
            "acme", broker_url=f"mqtts://localhost:{free_port()}", outbox=outbox))
        await offline.connect(wait=False)
        sent = {await offline.broadcast_market_insight(insight(price=1.0 + i,
                                                               product=f"sku-{i}"))
                for i in range(100)}
        await offline.disconnect()
        async with PearNetwork(make_config("acme", outbox=outbox)):
            got: list[Any] = await take(stream, 100, timeout=30)
    assert {g.item_id for g in got} == sent
