"""Broker conformance (issue #20): the same tests on every supported broker kind, through the
``broker_kind`` fixture (mosquitto, the embedded amqtt broker, a 2-node aedes cluster whose
senders use node 0 and receivers node 1, so traffic crosses the nodes).

What a node sees must not depend on the broker: live exchange, a late joiner's complete
sync, a persistent session across a disconnect, the ACL, and who may connect at all. Where
the brokers legitimately differ (how a forbidden publish is refused), the test names the
difference and asserts each broker's documented behaviour.

The amqtt broker runs on the test's event loop, so the synchronous ``MqttProbe`` is only ever
waited on through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from brokerkinds import BrokerUnderTest
from brokers import MqttProbe, NetworkPKI, new_unique_id
from paho.mqtt.enums import MQTTProtocolVersion

from pear_mqtt.model.insight import MarketInsight
from pear_mqtt.model.topics import TopicScheme
from pear_mqtt.node.network import PearNetwork
from pear_mqtt.security.pki import CertPaths

pytestmark = pytest.mark.integration

Take = Callable[..., Awaitable[list[Any]]]
MakeInsight = Callable[..., MarketInsight]

SUBACK_REFUSED = 128  # MQTT 3.1.1 SUBACK "Failure" (MQTT 5: "Unspecified error")


async def test_live_insights_arrive_verified(broker_kind: BrokerUnderTest, insight: MakeInsight,
                                             take: Take) -> None:
    n = 20
    async with PearNetwork(broker_kind.config("globex", receiving=True)) as rx, \
            PearNetwork(broker_kind.config("acme")) as tx:
        stream = rx.insights()
        # Two of each of ten categories: one envelope of several categories on every broker
        # (the $mixed topic level), one of dairy alone.
        sent = await tx.broadcast_many(
            [insight(product=f"live-{i}", category=f"live/c{i % 10}") for i in range(n)]
            + [insight(product=f"dairy-{i}") for i in range(n)])
        got = await take(stream, 2 * n, timeout=30)
        rejected = rx.status().dropped
    assert all(g.topic.endswith(f"/acme/insights/{g.insight.category}") for g in got)
    assert sorted(g.item_id for g in got) == sorted(sent)
    assert {(g.member, g.node) for g in got} == {("acme", "store-1")}
    assert not any(g.retained for g in got)
    assert not rejected, rejected


async def test_a_late_joiner_syncs_every_state_proven_complete(
        broker_kind: BrokerUnderTest, insight: MakeInsight, tmp_path: Any) -> None:
    n = 100
    categories = {f"cat/c{i:03d}" for i in range(n)}
    # An outbox turns on the sender's history log: its signed head names the checkpoint
    # pages, so the late joiner knows when its snapshot is complete on any broker.
    async with PearNetwork(broker_kind.config("acme", outbox=tmp_path / "acme.sqlite")) as tx:
        sent = await tx.broadcast_many([insight(category=c, price=1.0 + i)
                                        for i, c in enumerate(sorted(categories))])
        await tx.flush(timeout=30)
    async with PearNetwork(broker_kind.config("initech", receiving=True)) as late:
        result = await late.sync(timeout=60)
    assert result.missing_pages == {}
    assert sorted(r.item_id for r in result) == sorted(sent)
    assert {r.insight.category for r in result} == categories
    assert {r.member for r in result} == {"acme"}


async def test_a_restarted_store_keeps_every_state_in_its_pages(
        broker_kind: BrokerUnderTest, insight: MakeInsight, tmp_path: Any) -> None:
    # Before it sends a page, a restarted store reads its retained states back; whatever
    # order the broker streams them in, its next pages still hold every one.
    n = 200
    config = broker_kind.config("acme", outbox=tmp_path / "acme.sqlite")
    async with PearNetwork(config) as tx:
        await tx.broadcast_many([insight(category=f"rs/c{i:03d}") for i in range(n)])
        await tx.flush(timeout=30)
    async with PearNetwork(config) as tx:
        await tx.broadcast_market_insight(insight(category="rs/new"))
        await tx.flush(timeout=30)
    async with PearNetwork(broker_kind.config("initech", receiving=True)) as late:
        result = await late.sync(timeout=60)
    assert result.missing_pages == {}
    assert {r.insight.category for r in result} == {
        *(f"rs/c{i:03d}" for i in range(n)), "rs/new"}


# amqtt hands a reconnecting session what it queued with the RETAIN flag set (0.12:
# Broker._publish_session_retained_messages), where MQTT 3.1.1 section 3.3.1.3 wants it clear
# for anything not sent because of a new subscription; the node reports what the broker says.
QUEUED_ARRIVE_RETAINED = {"mosquitto": False, "amqtt": True, "cluster": False}


async def test_a_persistent_session_keeps_what_was_sent_while_away(
        broker_kind: BrokerUnderTest, insight: MakeInsight, take: Take) -> None:
    # amqtt keeps sessions in memory while it runs, mosquitto likewise, the cluster in redis:
    # all three must hand the receiver what it missed.
    n = 30
    rx_config = broker_kind.config("globex", receiving=True)
    async with PearNetwork(rx_config) as first:
        assert first.status().connected  # the session and its subscriptions exist now
    async with PearNetwork(broker_kind.config("acme")) as tx:
        sent = await tx.broadcast_many([insight(product=f"away-{i}") for i in range(n)])
        await tx.flush(timeout=30)
    again = PearNetwork(rx_config)
    stream = again.insights()  # before connecting: the queued ones come at once
    async with again:
        got = await take(stream, n, timeout=30)
        status = again.status()
    assert sorted(g.item_id for g in got) == sorted(sent)
    assert {g.retained for g in got} == {QUEUED_ARRIVE_RETAINED[broker_kind.kind]}
    assert status.duplicates == 0


async def test_a_node_that_asks_for_no_session_gets_none(
        broker_kind: BrokerUnderTest, insight: MakeInsight, take: Take) -> None:
    # session_expiry 0: MQTT 5 says so in CONNECT; on MQTT 3.1.1 (amqtt, the cluster) it
    # has to be a clean session, or the broker queues for the node for ever.
    rx_config = broker_kind.config("globex", receiving=True, session_expiry=0)
    async with PearNetwork(rx_config):
        pass
    async with PearNetwork(broker_kind.config("acme")) as tx:
        await tx.broadcast_many([insight(product=f"gone-{i}") for i in range(5)])
        await tx.flush(timeout=30)
        again = PearNetwork(rx_config)
        stream = again.insights()
        async with again:
            after = await tx.broadcast_market_insight(insight(product="after"))
            (first,) = await take(stream, 1, timeout=30)
    assert first.item_id == after  # nothing of what was sent while it was away


# -- raw MQTT clients: the ACL and who may connect ------------------------------------------

def _probe(port: int, certs: CertPaths, ca: Any) -> MqttProbe:
    return MqttProbe(host="localhost", port=port, certs=certs, ca=ca,
                     client_id=new_unique_id("conf-"), protocol=MQTTProtocolVersion.MQTTv311)


async def _connected(port: int, certs: CertPaths, ca: Any) -> MqttProbe:
    p = _probe(port, certs, ca)
    rc = await asyncio.to_thread(p.connect, 10.0)
    assert not rc.is_failure, rc
    return p


# How a broker refuses a publish its ACL denies: mosquitto and amqtt drop it and keep the
# writer connected (MQTT 3.1.1 has no negative PUBACK); aedes (the cluster) closes the
# writer's connection, its answer to a failed authorizePublish.
CUTS_OFF_FORGER = {"mosquitto": False, "amqtt": False, "cluster": True}
# How a broker treats a filter wider than the reader's rules: amqtt (AccessPolicy) and the
# cluster refuse it with SUBACK 128; mosquitto 2 grants it and applies the "topic read"
# rules to every message it would deliver (mosquitto.conf(5)), so only readable ones arrive.
REFUSES_WIDE_FILTER = {"mosquitto": False, "amqtt": True, "cluster": True}


async def test_the_acl_confines_writes_and_reads(broker_kind: BrokerUnderTest,
                                                 pki: NetworkPKI) -> None:
    kind = broker_kind.kind
    acme = TopicScheme(mode="consortium", network=pki.network, member="acme")
    globex = TopicScheme(mode="consortium", network=pki.network, member="globex")
    probes: list[MqttProbe] = []
    try:
        watcher = await _connected(broker_kind.receive_port, pki.node("globex"), pki.ca)
        probes.append(watcher)
        (granted,) = await asyncio.to_thread(watcher.subscribe, acme.live_filter())
        assert granted.value == 1  # every member's insights: allowed
        (wide,) = await asyncio.to_thread(watcher.subscribe, f"{acme.network_root}/#")
        assert (wide.value == SUBACK_REFUSED) is REFUSES_WIDE_FILTER[kind], wide

        forger = await _connected(broker_kind.send_port, pki.node("acme"), pki.ca)
        probes.append(forger)
        # Its own subtree reaches globex: the watcher would see a forged message too.
        own = acme.insights("x/own")
        await asyncio.to_thread(forger.publish, own, b"own")
        await asyncio.to_thread(watcher.expect, own, 10.0)
        # acme may write its log replies (own subtree) but only acme reads them.
        unreadable = acme.log_reply("store-1")
        await asyncio.to_thread(forger.publish, unreadable, b"private reply")

        await asyncio.to_thread(forger.publish, globex.insights("x/forged"), b"forged", qos=0)
        if CUTS_OFF_FORGER[kind]:
            assert await asyncio.to_thread(forger.wait_disconnected, 10.0)
            writer = await _connected(broker_kind.send_port, pki.node("acme"), pki.ca)
            probes.append(writer)
        else:
            writer = forger
        # A broker handles one client's packets in order: the forged one was dealt with
        # before this PUBACK (or before the disconnect).
        marker = acme.insights("x/marker")
        ack = await asyncio.to_thread(writer.publish, marker, b"marker")
        assert ack is not None and not ack.is_failure
        assert forger.is_connected is not CUTS_OFF_FORGER[kind]
        _, before = await asyncio.to_thread(watcher.expect, marker, 10.0)
        leaked = [m.topic for m in before
                  if m.topic.startswith(globex.member_root) or m.topic == unreadable]
        assert leaked == []
    finally:
        for p in probes:
            await asyncio.to_thread(p.close)


@pytest.mark.parametrize("which", ["foreign", "revoked"])
async def test_foreign_and_revoked_certificates_cannot_connect(
        broker_kind: BrokerUnderTest, pki: NetworkPKI, which: str) -> None:
    bad: CertPaths = getattr(pki, which)
    for port in sorted({broker_kind.send_port, broker_kind.receive_port}):
        # Control: the same client set-up with a good certificate gets in, so the refusal
        # below is the broker's and not a client-side trust problem.
        good = await _connected(port, pki.node("acme"), pki.ca)
        await asyncio.to_thread(good.close)
        p = _probe(port, bad, pki.ca)
        try:
            rc = await asyncio.to_thread(p.connect, 10.0)
        except (ssl.SSLError, OSError, ConnectionError):
            continue  # TLS alert or closed before CONNACK: refused
        finally:
            await asyncio.to_thread(p.close)
        assert rc.is_failure, f"{which} certificate connected to {broker_kind.kind}:{port}"
