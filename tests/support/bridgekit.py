"""The bridge test harness: two brokers of the test network, the bridge's movable clock, and
helpers that publish inputs and compute the reference aggregates the bridge must match."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from brokers import GROUP_KEY, MosquittoBroker, MqttProbe, NetworkPKI, Received, probe

from pear_mqtt.bridge.config import BridgeConfig, PublicConfig, SourceConfig
from pear_mqtt.bridge.partials import owner_of, partition_key
from pear_mqtt.bridge.service import Bridge
from pear_mqtt.bridge.status import BridgeStatus
from pear_mqtt.config.models import (
    EncryptionConfig,
    NetworkConfig,
    PrivacyConfig,
    ReliabilityConfig,
)
from pear_mqtt.model.aggregates import AggregateBody
from pear_mqtt.model.insight import (
    MarketInsight,
    NetworkMode,
    PriceData,
    SalesData,
    SharingLevel,
    TrendData,
)
from pear_mqtt.node.network import PearNetwork
from pear_mqtt.privacy.aggregate import aggregate_cell
from pear_mqtt.privacy.filter import Contribution
from pear_mqtt.security.pki import CertPaths

DAY = 86400
K = 5
CAP = 0.25
# Price and sales are sealed to the aggregator; trends are "full", but a derived field follows
# its source: the price change is sealed (and aggregated) with the prices it derives from.
POLICY = {"price_data": SharingLevel.AGGREGATED, "sales_data": SharingLevel.AGGREGATED,
          "trends": SharingLevel.FULL}
FAST = ReliabilityConfig(reconnect_min_delay=0.05, reconnect_max_delay=0.5, batch_linger=0)
WAIT = 30.0


class Clock:
    """The bridge's clock: real time until the test moves it."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def yesterday() -> datetime:
    start = int(time.time() // DAY) * DAY - DAY
    return datetime.fromtimestamp(start, UTC)


@dataclass
class Net:
    """Two brokers of the test network, the aggregator key pair and a public spy."""

    pki: NetworkPKI
    consortium: MosquittoBroker
    public: MosquittoBroker
    key_file: Path
    pub_file: Path
    root: Path
    spy: MqttProbe
    members: dict[str, str] = field(default_factory=dict)  # company -> member id

    def member(self, name: str) -> str:
        """A distinctive member id per logical company (so a leak is easy to spot)."""
        if name not in self.members:
            self.members[name] = f"co{uuid.uuid4().hex[:10]}"
        return self.members[name]

    def node_config(self, member: str, *, node: str = "store-1",
                    mode: NetworkMode = NetworkMode.CONSORTIUM,
                    levels: dict[str, SharingLevel] | None = None,
                    certs: CertPaths | None = None) -> NetworkConfig:
        # Private networks have their own broker in production; here the consortium broker,
        # whose ACL covers every mode of the test network, stands in for it.
        broker = self.public if mode is NetworkMode.PUBLIC else self.consortium
        sharing = levels if levels is not None else (
            POLICY if mode is NetworkMode.CONSORTIUM else {})
        return NetworkConfig(
            mode=mode, company_id=member, network_id=self.pki.network, node_id=node,
            broker_url=broker.tls_url, tls=self.pki.tls(certs or self.pki.node(member, node)),
            privacy=PrivacyConfig(aggregator_key_file=self.pub_file, data_sharing=sharing),
            encryption=(EncryptionConfig(keys={"k1": GROUP_KEY}, active="k1")
                        if mode is NetworkMode.CONSORTIUM else EncryptionConfig()),
            reliability=FAST)

    def enrolled_config(self, company: str, *, store: str = "store-1") -> NetworkConfig:
        """A consortium node of ``company`` enrolled under the CA's pseudonyms: its config
        keeps the company's own id, its node id is the store's pseudonym."""
        certs, who = self.pki.enrolled(company, store)
        return self.node_config(company, node=who.node, certs=certs)

    def bridge_config(self, *, bridge_id: str = "bridge", state: str = "bridge.sqlite",
                      consortium: bool = True, contributions: bool = False,
                      private: Sequence[SourceConfig] = (), **kw: Any) -> BridgeConfig:
        tls = self.pki.tls(self.pki.bridge)
        return BridgeConfig(
            bridge_id=bridge_id,
            consortium=SourceConfig(
                network_id=self.pki.network, broker_url=self.consortium.tls_url, tls=tls,
                encryption=EncryptionConfig(keys={"k1": GROUP_KEY}, active=kw.pop("active", None)),
                data_sharing=kw.pop("sharing", POLICY),
                aggregator_key_file=self.key_file, reliability=FAST) if consortium else None,
            private=list(private),
            public=PublicConfig(network_id=self.pki.network, broker_url=self.public.tls_url,
                                tls=tls, aggregator_key_file=self.key_file,
                                contributions=contributions, reliability=FAST),
            min_companies=kw.pop("min_companies", K), dominance_cap=kw.pop("dominance_cap", CAP),
            window_seconds=DAY, publication_lag_seconds=kw.pop("publication_lag_seconds", DAY),
            settle_seconds=kw.pop("settle_seconds", 0),
            state_path=self.root / state, tick_seconds=0.05, **kw)

    def marker(self) -> list[Received]:
        """Everything the spy received so far, proved complete by a marker published after
        it (mosquitto forwards one publisher's messages to a subscriber in order)."""
        topic = f"pear/v1/public/{self.pki.network}/spy/{uuid.uuid4().hex}"
        with probe(self.public) as p:
            p.publish(topic, b"marker")
        _, before = self.spy.expect(topic, timeout=WAIT)
        return before


def insight(category: str, *, start: datetime, price: float | None = None,
            units: float | None = None, revenue: float | None = None,
            change: float | None = None, region: str = "north",
            product: str | None = None) -> MarketInsight:
    return MarketInsight(
        category=category, product_id=product, region=region, window_start=start,
        window_end=start + timedelta(hours=1),
        price_data=PriceData(currency="EUR", price=price) if price is not None else None,
        sales_data=SalesData(units=units, revenue=revenue) if units is not None else None,
        trends=TrendData(price_change_pct=change) if change is not None else None)


@dataclass(frozen=True)
class Input:
    company: str  # logical company
    store: str
    insight: MarketInsight


async def publish(net: Net, inputs: Sequence[Input], *,
                  mode: NetworkMode = NetworkMode.CONSORTIUM,
                  levels: dict[str, SharingLevel] | None = None, many: bool = False) -> None:
    """Each (company, store) as its own node, as in production; ``many``: each node's
    insights in one ``broadcast_many``."""
    by_node: dict[tuple[str, str], list[MarketInsight]] = {}
    for i in inputs:
        by_node.setdefault((i.company, i.store), []).append(i.insight)

    async def one(company: str, store: str, items: list[MarketInsight]) -> None:
        async with PearNetwork(net.node_config(net.member(company), node=store,
                                               mode=mode, levels=levels)) as node:
            if many:
                await node.broadcast_many(items)
            else:
                for it in items:
                    await node.broadcast_market_insight(it)
            await node.flush(timeout=WAIT)

    await asyncio.gather(*(one(c, s, items) for (c, s), items in by_node.items()))


def reference(net: Net, inputs: Sequence[Input], *, min_companies: int = K,
              dominance_cap: float = CAP) -> dict[tuple[str, str], dict[str, Any]]:
    """What the bridge should publish, computed independently with privacy.aggregate_cell
    over the exact values, companies named by member: {(category, region): {group: fields}}."""
    cells: dict[tuple[str, str], list[Contribution]] = {}
    for i in inputs:
        it = i.insight
        values: dict[str, dict[str, float]] = {}
        if it.price_data is not None and it.price_data.price is not None:
            values["price_data"] = {"price": it.price_data.price}
        if it.sales_data is not None:
            values["sales_data"] = {k: v for k, v in it.sales_data.model_dump().items()
                                    if v is not None}
        # The price change follows the (aggregated) price: sealed, so aggregated too.
        if it.trends is not None and it.trends.price_change_pct is not None:
            values["trends"] = {"price_change_pct": it.trends.price_change_pct}
        if not values:
            continue
        cells.setdefault((it.category, it.region), []).append(Contribution(
            company=net.member(i.company), category=it.category, region=it.region,
            window_start=it.window_start, window_end=it.window_end, currency="EUR",
            values=values))
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for key, contributions in cells.items():
        outcomes = aggregate_cell(contributions, min_companies=min_companies,
                                  dominance_cap=dominance_cap)
        groups = {g: {n: s.model_dump(exclude_none=True) for n, s in o.statistics.items()}
                  for g, o in outcomes.items() if o.statistics}
        if groups:
            out[key] = groups
    return out


def published(messages: Sequence[Received], network: str) -> dict[str, Received]:
    """The latest retained aggregate per category topic."""
    prefix = f"pear/v1/public/{network}/aggregates/"
    return {m.topic[len(prefix):]: m for m in messages if m.topic.startswith(prefix)}


def cells_of(payload: bytes) -> dict[tuple[str, str], dict[str, Any]]:
    body = AggregateBody.model_validate(json.loads(payload)["body"])
    return {(body.category, c.region): {
        g.group: {n: s.model_dump(exclude_none=True) for n, s in g.fields.items()}
        for g in c.groups} for c in body.cells}


def assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    for group, fields in want.items():
        assert got[group].keys() == fields.keys(), group
        for name, stats in fields.items():
            g = got[group][name]
            assert g.keys() == stats.keys(), (group, name)
            for key, value in stats.items():
                assert g[key] == pytest.approx(value, rel=1e-12, abs=1e-12), (group, name, key)


def number_pattern(value: float) -> re.Pattern[bytes]:
    """A JSON number token equal to ``value``'s repr, not a digit run inside another."""
    return re.compile(rb"(?<![0-9.])" + re.escape(repr(value).encode()) + rb"(?![0-9])")


def assert_nothing_individual(net: Net, messages: Sequence[Received],
                              inputs: Sequence[Input]) -> None:
    """No id, pseudonym or individual number in any byte the public can read.

    Participants' own contrib/ and presence topics are excluded: the broker's ACL lets only
    the bridge read contributions, and a participant's presence is its own business.
    """
    readable = [m for m in messages if "/contrib/" not in m.topic and "/nodes/" not in m.topic]
    wire = b"\n".join(m.topic.encode() + b" " + m.payload for m in readable)
    for company in {i.company for i in inputs}:
        member = net.member(company)
        assert member.encode() not in wire
    # Every pseudonym the CA assigned, of companies and stores (the ids are the CA's to keep).
    for _, who in net.pki.enrolments.values():
        assert who.member.encode() not in wire and who.node.encode() not in wire
    for i in inputs:
        it = i.insight
        numbers = [it.price_data.price if it.price_data else None,
                   *(it.sales_data.model_dump().values() if it.sales_data else ()),
                   it.trends.price_change_pct if it.trends else None]
        for value in numbers:
            if value is not None:
                assert number_pattern(value).search(wire) is None, value


async def wait(bridge: Bridge, predicate: Callable[[BridgeStatus], bool],
               timeout: float = WAIT) -> BridgeStatus:
    try:
        return await bridge.wait_for(predicate, timeout=timeout)
    except TimeoutError:
        raise AssertionError(f"bridge status never matched: {bridge.status()}") from None


async def close_window(bridge: Bridge, clock: Clock, *, windows: int = 1) -> BridgeStatus:
    """Move the clock past the lag and wait until the window's messages are acknowledged."""
    before = bridge.status().windows_published
    clock.advance(2 * DAY + 1)
    bridge.poke()
    return await wait(bridge, lambda s: s.windows_published >= before + windows
                      and s.outbox_depth == 0)


def instance_of(net: Net, company: str, category: str, instances: int) -> int:
    """The scale-out instance that counts ``company``'s consortium items of ``category``."""
    return owner_of(partition_key(kind="consortium", network=net.pki.network,
                                  sender=net.member(company), category=category), instances)


def companies_by_instance(net: Net, category: str, *, instances: int,
                          each: int) -> list[list[str]]:
    """``each`` logical companies per scale-out instance: grouped by the instance that
    counts their (random) member id's items of ``category``, so every instance is sure to
    count some of the input."""
    groups: list[list[str]] = [[] for _ in range(instances)]
    while min(len(g) for g in groups) < each:
        name = f"sc{uuid.uuid4().hex[:6]}"
        owner = instance_of(net, name, category, instances)
        if len(groups[owner]) < each:
            groups[owner].append(name)
    return groups


def aggregate_bodies(net: Net, messages: Sequence[Received]) -> dict[tuple[str, str],
                                                                     list[dict[str, Any]]]:
    """Every public aggregate body the spy saw, by (category, window start), in order: the
    signed envelopes differ (signature, sequence, time), their bodies must not."""
    prefix = f"pear/v1/public/{net.pki.network}/aggregates/"
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for m in messages:
        if m.topic.startswith(prefix) and m.payload:
            body = json.loads(m.payload)["body"]
            out.setdefault((body["category"], body["window_start"]), []).append(body)
    return out
