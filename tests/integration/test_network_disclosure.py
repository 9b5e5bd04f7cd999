"""What a node puts on the wire under its sharing levels, and what a re-sent observation
does, seen by raw subscribers on a real mosquitto."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from brokers import GROUP_KEY, MosquittoBroker, NetworkPKI, Received, probe

from pear_mqtt.config.models import EncryptionConfig, NetworkConfig
from pear_mqtt.model.insight import (
    FIELD_GROUPS,
    MarketInsight,
    NetworkMode,
    SalesData,
    SharingLevel,
)
from pear_mqtt.node.network import PearNetwork
from pear_mqtt.privacy.filter import Contribution
from pear_mqtt.privacy.ranges import ValueRange
from pear_mqtt.security.envelope import EnvelopeCodec
from pear_mqtt.security.seal import SealOpener
from pear_mqtt.security.signing import Signer
from pear_mqtt.security.trust import TrustStore


def with_sharing(config: NetworkConfig, **levels: str) -> NetworkConfig:
    privacy = config.privacy.model_copy(update={"data_sharing": {
        g: SharingLevel(v) for g, v in levels.items()}})
    return NetworkConfig.model_validate({**config.model_dump(), "privacy": privacy})


def numbers(node: Any) -> Iterator[float]:
    """Every number in a JSON document."""
    if isinstance(node, dict):
        for v in node.values():
            yield from numbers(v)
    elif isinstance(node, list):
        for v in node:
            yield from numbers(v)
    elif isinstance(node, int | float) and not isinstance(node, bool):
        yield float(node)


def seen_until_marker(mosquitto: MosquittoBroker, spy: Any,
                      prefix: str = "pear/v1/spy") -> list[Received]:
    """Everything ``spy`` received so far, proved complete by a marker published after it
    (under ``prefix``, which ``spy`` must read)."""
    topic = f"{prefix}/{uuid.uuid4().hex}"
    with probe(mosquitto) as p:
        p.publish(topic, b"marker")
    _, before = spy.expect(topic, timeout=10)
    return list(before)


@pytest.fixture
def reader(pki: NetworkPKI) -> Iterator[EnvelopeCodec]:
    """A consortium member's codec (initech): it reads every member's items."""
    certs = pki.node("initech")
    yield EnvelopeCodec(
        signer=Signer.from_files(key_file=certs.key, cert_file=certs.cert),
        trust=TrustStore.from_files(ca_files=[pki.ca], network=pki.network),
        encryption=EncryptionConfig(keys={"k1": GROUP_KEY}))


@pytest.mark.parametrize("mode", [NetworkMode.CONSORTIUM, NetworkMode.PRIVATE])
async def test_none_for_every_group_sends_nothing(
        make_config: Callable[..., NetworkConfig], mosquitto: MosquittoBroker,
        insight: Callable[..., MarketInsight], mode: NetworkMode) -> None:
    """Not the category, product, region, window or sample size: no insight, no state, no
    checkpoint page; only the node's presence (and flush()'s own marker round trip)."""
    config = with_sharing(make_config("acme", mode=mode), **dict.fromkeys(FIELD_GROUPS, "none"))
    # the plaintext listener has no ACL: this subscriber sees every message of every client
    with probe(mosquitto, subscribe=["#"]) as spy:
        async with PearNetwork(config) as tx:
            for i in range(5):
                await tx.broadcast_market_insight(insight(category=f"secret/c{i}",
                                                          product=f"sku-{i}"))
            await tx.flush(timeout=10)
            assert tx.status().outbox_depth == 0
        seen = seen_until_marker(mosquitto, spy)
    ours = [m for m in seen if "/acme/" in m.topic]
    assert ours, "the node's presence should have been seen"
    for m in ours:
        assert "/nodes/store-1" in m.topic and "/checkpoint/" not in m.topic, m.topic
        assert b"secret" not in m.payload and b"sku-" not in m.payload
        assert b"2026-11-01" not in m.payload and b"north" not in m.payload


async def test_consortium_defaults_put_no_derived_value_on_the_wire(
        make_config: Callable[..., NetworkConfig], mosquitto: MosquittoBroker,
        pki: NetworkPKI, aggregator: tuple[Path, SealOpener], reader: EnvelopeCodec,
        insight: Callable[..., MarketInsight]) -> None:
    """A member reading everything acme sends under the consortium defaults: price ranges and
    the direction; never the sample size, the exact price change or anything of the sealed
    sales (the sample size equals the sealed transaction count here, as the simulator sets
    it). An insight with sales only goes as its sealed part alone."""
    with_price = insight(price=2.4567, units=1234.0, change=3.21)
    with_price = with_price.model_copy(update={"sales_data": SalesData(
        units=1234.0, transactions=17.0)})
    sales_only = with_price.model_copy(update={"price_data": None, "trends": None,
                                               "category": "grocery/bakery"})
    with probe(mosquitto, pki.node("initech", "spy"),
               subscribe=["pear/v1/consortium/+/acme/#"]) as spy:
        async with PearNetwork(make_config("acme")) as tx:
            await tx.broadcast_market_insight(with_price)
            await tx.broadcast_market_insight(sales_only)
            await tx.flush(timeout=10)
        seen = seen_until_marker(mosquitto, spy,
                                 f"pear/v1/consortium/{pki.network}/acme/insights/marker")
    items: dict[str, list[dict[str, Any]]] = {}
    for m in seen:
        if ("/insights/" not in m.topic and "/state/" not in m.topic) or "/marker" in m.topic:
            continue
        body = reader.decode(m.payload, check_replay=False).message.body
        for item in body.get("items", [body]):
            items.setdefault(m.topic.rsplit("/", 1)[-1], []).append(item)
    dairy, bakery = items["dairy"], items["bakery"]
    assert dairy and all(set(i) == {"iid", "insight", "sealed"} for i in dairy)
    for item in dairy:
        shared = item["insight"]
        assert "sample_size" not in shared
        assert shared["groups"]["trends"] == {"direction": "up"}
        price = ValueRange.model_validate(shared["groups"]["price_data"]["price"])
        assert 2.4567 in price
        assert not {1234.0, 17.0, 3.21} & set(numbers(shared))
        sealed = Contribution.model_validate_json(aggregator[1].open(item["sealed"]))
        assert sealed.sample_size == 17 and sealed.values["sales_data"]["transactions"] == 17
    # the sealed part alone: no clear metadata beyond the topic that routes it, no state
    assert [set(i) for i in bakery] == [{"iid", "sealed"}]
    assert not any("/state/" in m.topic and m.topic.endswith("/bakery") for m in seen)
    opened = Contribution.model_validate_json(aggregator[1].open(bakery[0]["sealed"]))
    assert opened.category == "grocery/bakery" and opened.sample_size == 17


async def test_a_re_sent_observation_keeps_its_id_and_is_a_duplicate_to_receivers(
        make_config: Callable[..., NetworkConfig], insight: Callable[..., MarketInsight],
        take: Callable[..., Awaitable[list[Any]]]) -> None:
    async with PearNetwork(make_config("globex")) as rx, \
            PearNetwork(make_config("acme")) as tx, \
            PearNetwork(make_config("acme", node="store-2")) as other_store:
        stream = rx.insights()
        first = await tx.broadcast_market_insight(insight(price=2.0))
        distinct = await tx.broadcast_market_insight(insight(price=2.0, product="sku-9"))
        again = await tx.broadcast_market_insight(insight(price=2.0))
        changed = await tx.broadcast_market_insight(insight(price=9.0))
        elsewhere = await other_store.broadcast_market_insight(insight(price=2.0))
        got = {g.item_id: g for g in await take(stream, 3)}
        # one sender's messages arrive in order: once this one is in, so are the repeats
        last = await tx.broadcast_market_insight(insight(category="grocery/last"))
        (after,) = await take(stream, 1)
        status = rx.status()
        await tx.flush(timeout=10)  # the held-back retained state goes out too
        state = await rx.sync(timeout=10)
    assert first == again == changed
    assert len({first, elsewhere, distinct}) == 3 and after.item_id == last
    assert {(i, g.node) for i, g in got.items()} == {
        (first, "store-1"), (distinct, "store-1"), (elsewhere, "store-2")}
    # the live stream has the first copy; the repeats are duplicates
    assert 2.0 in got[first].insight.groups["price_data"]["price"]
    assert status.duplicates == 2 and not status.dropped
    # the retained state holds the latest values
    (latest,) = [r.insight for r in state
                 if r.node == "store-1" and r.insight.category == "grocery/dairy"]
    assert 9.0 in latest.groups["price_data"]["price"] and latest.product_id is None
