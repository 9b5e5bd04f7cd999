"""The bridge's aggregates for the consortium's members, and the price signal under the
default policy: real consortium and public mosquitto brokers, real nodes.

Members publish their prices ``ranges_only`` (the bucket, nothing sealed) and their sales
``aggregated``. The bridge publishes each window to the consortium's members after their lag
(one day) and to the public after its own (three days): per cell the histogram of the
members' latest price buckets and the median bucket — only over at least k companies. The
bridge's clock is a :class:`Clock` the test moves; independent subscribers on ``#`` of both
brokers' plaintext listeners (no ACL) see every byte that reaches them.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from brokers import GROUP_KEY, MosquittoBroker, MqttProbe, NetworkPKI, Received, probe

from pear_mqtt.bridge.config import (
    BridgeConfig,
    ConsortiumOutputConfig,
    PublicConfig,
    SourceConfig,
)
from pear_mqtt.bridge.output import verify_publication
from pear_mqtt.bridge.service import Bridge
from pear_mqtt.bridge.status import BridgeStatus
from pear_mqtt.config.models import (
    EncryptionConfig,
    NetworkConfig,
    PrivacyConfig,
    ReliabilityConfig,
)
from pear_mqtt.model.aggregates import AggregateBody, PublishedGroupBody
from pear_mqtt.model.insight import MarketInsight, NetworkMode, PriceData, SalesData, SharingLevel
from pear_mqtt.model.topics import TopicScheme
from pear_mqtt.node.network import PearNetwork
from pear_mqtt.node.records import ReceivedAggregate
from pear_mqtt.privacy.ranges import RangeScheme
from pear_mqtt.security.envelope import EnvelopeCodec
from pear_mqtt.security.seal import (
    generate_x25519_key,
    save_x25519_private_key,
    save_x25519_public_key,
)
from pear_mqtt.security.signing import Signer
from pear_mqtt.security.trust import TrustStore

DAY = 86400
K = 5
CATEGORY = "grocery/coffee"
# The default consortium policy for the two groups these tests use.
POLICY = {"price_data": SharingLevel.RANGES_ONLY, "sales_data": SharingLevel.AGGREGATED}
FAST = ReliabilityConfig(reconnect_min_delay=0.05, reconnect_max_delay=0.5, batch_linger=0)
WAIT = 30.0
NOT_AUTHORIZED = 0x87


class Clock:
    """The bridge's clock: real time until the test moves it."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@dataclass
class Net:
    """The consortium and public brokers, the aggregator key pair and a spy on each."""

    pki: NetworkPKI
    consortium: MosquittoBroker
    public: MosquittoBroker
    key_file: Path
    pub_file: Path
    root: Path
    consortium_spy: MqttProbe
    public_spy: MqttProbe

    def node_config(self, member: str, *, node: str = "store-1") -> NetworkConfig:
        return NetworkConfig(
            mode=NetworkMode.CONSORTIUM, company_id=member, network_id=self.pki.network,
            node_id=node, broker_url=self.consortium.tls_url,
            tls=self.pki.tls(self.pki.node(member, node)),
            privacy=PrivacyConfig(aggregator_key_file=self.pub_file, data_sharing=POLICY),
            encryption=EncryptionConfig(keys={"k1": GROUP_KEY}, active="k1"), reliability=FAST)

    def bridge_config(self, *, state: str) -> BridgeConfig:
        tls = self.pki.tls(self.pki.bridge)
        return BridgeConfig(
            consortium=SourceConfig(
                network_id=self.pki.network, broker_url=self.consortium.tls_url, tls=tls,
                encryption=EncryptionConfig(keys={"k1": GROUP_KEY}, active="k1"),
                data_sharing=POLICY, aggregator_key_file=self.key_file, reliability=FAST),
            public=PublicConfig(network_id=self.pki.network, broker_url=self.public.tls_url,
                                tls=tls, contributions=False, reliability=FAST),
            consortium_output=ConsortiumOutputConfig(enabled=True,
                                                     publication_lag_seconds=DAY),
            min_companies=K, window_seconds=DAY, publication_lag_seconds=3 * DAY,
            settle_seconds=0, state_path=self.root / state, tick_seconds=0.05)

    def seen(self, spy: MqttProbe, broker: MosquittoBroker) -> list[Received]:
        """Everything ``spy`` received so far, proved complete by a marker after it."""
        topic = f"pear/v1/public/{self.pki.network}/spy/{uuid.uuid4().hex}"
        with probe(broker) as p:
            p.publish(topic, b"marker")
        _, before = spy.expect(topic, timeout=WAIT)
        return before


@pytest.fixture
def net(pki: NetworkPKI, mosquitto_factory: Callable[..., MosquittoBroker],
        tmp_path: Path) -> Iterator[Net]:
    consortium = mosquitto_factory(mode="consortium")
    public = mosquitto_factory(mode="public")
    key = generate_x25519_key()
    key_file, pub_file = tmp_path / "aggregator.key", tmp_path / "aggregator.pub"
    save_x25519_private_key(key, key_file)
    save_x25519_public_key(key.public_key(), pub_file)
    with probe(consortium, subscribe=["#"]) as c_spy, probe(public, subscribe=["#"]) as p_spy:
        yield Net(pki=pki, consortium=consortium, public=public, key_file=key_file,
                  pub_file=pub_file, root=tmp_path, consortium_spy=c_spy, public_spy=p_spy)


def yesterday() -> datetime:
    return datetime.fromtimestamp(int(time.time() // DAY) * DAY - DAY, UTC)


def insight(*, price: float, units: float, hour: int = 0) -> MarketInsight:
    start = yesterday() + timedelta(hours=hour)
    return MarketInsight(category=CATEGORY, region="north", window_start=start,
                         window_end=start + timedelta(hours=1),
                         price_data=PriceData(currency="EUR", price=price),
                         sales_data=SalesData(units=units))


async def publish(net: Net, prices: dict[str, Sequence[float]]) -> None:
    """Each member publishes its prices, one hour after the other (the last is its latest)."""

    async def one(member: str, values: Sequence[float]) -> None:
        async with PearNetwork(net.node_config(member)) as node:
            for hour, price in enumerate(values):
                await node.broadcast_market_insight(insight(price=price, units=10.0 + hour,
                                                            hour=hour))
            await node.flush(timeout=WAIT)

    await asyncio.gather(*(one(m, v) for m, v in prices.items()))


async def wait(bridge: Bridge, predicate: Callable[[BridgeStatus], bool]) -> BridgeStatus:
    try:
        return await bridge.wait_for(predicate, timeout=WAIT)
    except TimeoutError:
        raise AssertionError(f"bridge status never matched: {bridge.status()}") from None


def aggregates(messages: Sequence[Received], root: str) -> list[Received]:
    return [m for m in messages if m.topic.startswith(f"{root}/aggregates/")]


def price_group(body: AggregateBody) -> PublishedGroupBody:
    (cell,) = body.cells
    return next(g for g in cell.groups if g.group == "price_data")


def expected_histogram(latest: Sequence[float]) -> tuple[list[tuple[Any, Any, int]],
                                                         tuple[Any, Any]]:
    """(bucket lo, hi, companies) ascending and the lower median's bucket, computed with the
    scheme the nodes bucket with."""
    scheme = RangeScheme.from_config(PrivacyConfig())
    keys = sorted((b.lo, b.hi) for b in (scheme.bucket(p, category=CATEGORY) for p in latest))
    counts = {k: keys.count(k) for k in keys}
    ordered = [(lo, hi, n) for (lo, hi), n in counts.items()]
    return ordered, keys[(len(keys) + 1) // 2 - 1]


def histogram_of(group: PublishedGroupBody) -> tuple[list[tuple[Any, Any, int]],
                                                     tuple[Any, Any]]:
    assert group.histograms is not None
    h = group.histograms["price"]
    return [(b.lo, b.hi, b.companies) for b in h.buckets], (h.median.lo, h.median.hi)


async def test_ranges_only_prices_reach_the_members_then_the_public_as_histograms(
        net: Net, take: Callable[..., Awaitable[list[Any]]]) -> None:
    run = uuid.uuid4().hex[:6]
    members = [f"m{run}{n}" for n in range(6)]
    # Each member's latest price decides its bucket; the earlier ones must not count.
    prices = {m: [9.0 + n, 1.1 + 0.3 * n] for n, m in enumerate(members)}
    latest = [v[-1] for v in prices.values()]
    want = expected_histogram(latest)
    assert len(want[0]) > 1  # the prices spread over several buckets
    c_root = f"pear/v1/consortium/{net.pki.network}"
    p_root = f"pear/v1/public/{net.pki.network}"
    clock = Clock()
    reader_id = f"r{run}"
    async with Bridge(net.bridge_config(state=f"{run}.sqlite"), clock=clock) as bridge, \
            PearNetwork(net.node_config(reader_id)) as reader:
        stream = reader.aggregates()
        await publish(net, prices)
        await wait(bridge, lambda s: s.items_counted >= 12 and s.consortium_connected)

        # The consortium's lag is over, the public's is not.
        clock.advance(DAY + 1)
        bridge.poke()
        status = await wait(bridge, lambda s: s.consortium_cells_published >= 1
                            and s.outbox_depth == 0)
        assert status.windows_published == 0 and status.dropped == {}
        (received,) = await take(stream, 1, timeout=WAIT)
        assert isinstance(received, ReceivedAggregate)
        body = received.aggregate
        assert (body.network, body.category, received.topic) == (
            net.pki.network, CATEGORY, f"{c_root}/aggregates/{CATEGORY}")
        assert histogram_of(price_group(body)) == want
        assert price_group(body).histograms["price"].companies == 6  # type: ignore[index]
        (cell,) = body.cells
        sales = next(g for g in cell.groups if g.group == "sales_data")
        assert sales.fields["units"].companies == 6 and sales.fields["units"].sum == 6 * 21.0
        # The members' aggregate is encrypted under their group key: nothing on the wire.
        c_agg = aggregates(net.seen(net.consortium_spy, net.consortium), c_root)
        assert len(c_agg) == 1 and b'"enc"' in c_agg[0].payload
        assert b"histograms" not in c_agg[0].payload
        assert aggregates(net.seen(net.public_spy, net.public), p_root) == []

        # A member publishing for that window now is late: the members' aggregate covered
        # what there was, and the public one will cover the same.
        await publish(net, {f"late{run}": [50.0]})
        await wait(bridge, lambda s: s.dropped.get("late", 0) >= 1)

        # A member that joins later finds the retained aggregate with sync().
        async with PearNetwork(net.node_config(f"j{run}")) as joiner:
            result = await joiner.sync(timeout=WAIT)
        (synced,) = result.aggregates.values()
        assert synced.aggregate == body

        # The public's lag is over.
        clock.advance(2 * DAY)
        bridge.poke()
        status = await wait(bridge, lambda s: s.windows_published >= 1
                            and s.outbox_depth == 0)
        assert status.cells_published == 1
    p_msgs = net.seen(net.public_spy, net.public)
    (p_agg,) = aggregates(p_msgs, p_root)
    receipt = next(m for m in p_msgs if m.topic == f"{p_root}/state/bridge/receipts/{CATEGORY}")
    codec = EnvelopeCodec(
        signer=Signer.from_files(key_file=net.pki.bridge.key, cert_file=net.pki.bridge.cert),
        trust=TrustStore.from_files(ca_files=[net.pki.ca], network=net.pki.network))
    public, rec = verify_publication(aggregate_payload=p_agg.payload,
                                     receipt_payload=receipt.payload, codec=codec)
    assert histogram_of(price_group(public)) == want
    assert rec.cells[0].contributors == 6
    # No member id and no exact price reaches the public: only buckets over six companies.
    wire = b"\n".join(m.topic.encode() + b" " + m.payload for m in p_msgs)
    for member in [*members, reader_id]:
        assert member.encode() not in wire
    edges = {e for lo, hi, _ in want[0] for e in (lo, hi) if e is not None}
    for price in (p for v in prices.values() for p in v if p not in edges):
        token = re.compile(rb"(?<![0-9.])" + re.escape(repr(price).encode()) + rb"(?![0-9])")
        assert token.search(wire) is None, price


async def test_fewer_than_k_companies_yield_nothing_on_either_output(net: Net) -> None:
    run = uuid.uuid4().hex[:6]
    prices = {f"m{run}{n}": [1.1 + 0.2 * n] for n in range(K - 1)}
    clock = Clock()
    async with Bridge(net.bridge_config(state=f"{run}.sqlite"), clock=clock) as bridge:
        await publish(net, prices)
        await wait(bridge, lambda s: s.items_counted >= K - 1)
        clock.advance(DAY + 1)
        bridge.poke()
        await wait(bridge, lambda s: s.ticks > 0 and s.suppressed.get("below_k", 0) >= 2)
        clock.advance(2 * DAY)
        bridge.poke()
        status = await wait(bridge, lambda s: s.windows_published >= 1)
        assert status.cells_published == status.consortium_cells_published == 0
        assert status.suppressed["below_k"] >= 4  # prices and units, on both outputs
    for spy, broker, root in (
            (net.consortium_spy, net.consortium, f"pear/v1/consortium/{net.pki.network}"),
            (net.public_spy, net.public, f"pear/v1/public/{net.pki.network}")):
        seen = net.seen(spy, broker)
        assert [m.topic for m in seen if "/aggregates/" in m.topic
                or "/state/bridge/" in m.topic] == [], root


def test_only_the_bridge_writes_the_consortium_aggregates(net: Net) -> None:
    members = TopicScheme("consortium", net.pki.network, "acme")
    topics = [members.aggregate(CATEGORY), members.bridge_receipt(CATEGORY),
              members.bridge_state("ledger")]
    reader = net.pki.nodes["globex"]
    with probe(net.consortium, reader, subscribe=[members.aggregates_filter(),
                                                  f"{members.bridge_root}/state/bridge/#"]) \
            as globex:
        with probe(net.consortium, net.pki.nodes["acme"]) as acme:
            for topic in topics:
                rc = acme.publish(topic, b"forged", retain=True)
                assert rc is not None and rc.value == NOT_AUTHORIZED, (topic, rc)
        # A certificate named like the reserved level gets no more through its own subtree.
        with probe(net.consortium, net.pki.node("aggregates")) as named:
            rc = named.publish(members.aggregate(CATEGORY), b"forged", retain=True)
            assert rc is not None and rc.value == NOT_AUTHORIZED, rc
        # Positive control: the bridge writes there, and members read it.
        with probe(net.consortium, net.pki.bridge) as bridge:
            for topic in topics:
                rc = bridge.publish(topic, b"bridge", retain=True)
                assert rc is not None and not rc.is_failure, (topic, rc)
        got = [globex.expect(topic, timeout=WAIT)[0] for topic in topics]
    assert [m.payload for m in got] == [b"bridge"] * 3
