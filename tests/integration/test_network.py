"""PearNetwork end to end against a real mosquitto over mutual TLS."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from brokers import MosquittoBroker, MqttProbe, NetworkPKI, free_port, probe

from pear_mqtt.config.models import NetworkConfig, PrivacyConfig
from pear_mqtt.model.insight import MarketInsight, NetworkMode
from pear_mqtt.node.network import PearNetwork
from pear_mqtt.privacy.filter import Contribution
from pear_mqtt.privacy.ranges import ValueRange
from pear_mqtt.security.envelope import EnvelopeCodec
from pear_mqtt.security.seal import SealOpener
from pear_mqtt.security.signing import Signer
from pear_mqtt.security.trust import TrustStore

T0 = datetime(2026, 11, 1, tzinfo=UTC)


async def test_two_nodes_exchange_insights_under_consortium_policy(
        make_config: Callable[..., NetworkConfig], aggregator: tuple[Path, SealOpener],
        insight: Callable[..., MarketInsight], take: Callable[..., Awaitable[list[Any]]]) -> None:
    async with PearNetwork(make_config("globex", pseudonymous=True)) as rx, \
            PearNetwork(make_config("acme", pseudonymous=True)) as tx:
        stream = rx.insights()
        iid = await tx.broadcast_market_insight(insight())
        (got,) = await take(stream, 1)
        me = tx.identity  # what the operator's CA put in acme's certificate
    assert got.item_id == iid and (got.member, got.node) == (me.member, me.node)
    shared = got.insight
    # consortium defaults: price ranges_only, sales aggregated (sealed), trends full
    assert isinstance(shared.groups["price_data"]["price"], ValueRange)
    assert 2.4567 in shared.groups["price_data"]["price"]
    assert "sales_data" not in shared.groups
    # derived fields follow their source: the price change is not published next to price
    # ranges (it would narrow them), the direction is; the sample size follows the sales
    assert shared.groups["trends"] == {"direction": "up"} and shared.sample_size is None
    # anonymised: pseudonyms, not the real ids
    assert shared.company not in (None, "acme") and shared.store not in (None, "store-1")
    assert (shared.company, shared.store) == (me.member, me.node)
    # the sealed contribution opens only with the aggregator's key and holds the exact sales
    assert got.sealed is not None
    contribution = Contribution.model_validate_json(aggregator[1].open(got.sealed))
    assert contribution.values["sales_data"]["units"] == 1234.0
    assert contribution.sample_size == 17


async def test_nodes_writing_either_envelope_version_read_each_other(
        make_config: Callable[..., NetworkConfig], mosquitto: MosquittoBroker, pki: NetworkPKI,
        insight: Callable[..., MarketInsight], take: Callable[..., Awaitable[list[Any]]]) -> None:
    """A network mid-upgrade (docs/DESIGN.md, Envelope): a node told to write version 1 and
    one on the default, version 2, each read the other's insights, and each writes its own."""
    filters = ["pear/v1/consortium/testnet/acme/insights/#",
               "pear/v1/consortium/testnet/globex/insights/#"]
    with probe(mosquitto, pki.node("initech", "observer"), subscribe=filters) as wire:
        async with PearNetwork(make_config("acme", envelope_version=1)) as v1, \
                PearNetwork(make_config("globex")) as v2:
            at_v1, at_v2 = v1.insights(), v2.insights()
            from_v1 = await v1.broadcast_market_insight(insight(category="upgrade/one"))
            from_v2 = await v2.broadcast_market_insight(insight(category="upgrade/two"))
            (got_v2,) = await take(at_v2, 1)
            (got_v1,) = await take(at_v1, 1)
        seen = [wire.expect(lambda m: True, timeout=10)[0] for _ in range(2)]
    assert (got_v2.item_id, got_v2.insight.category) == (from_v1, "upgrade/one")
    assert (got_v1.item_id, got_v1.insight.category) == (from_v2, "upgrade/two")
    prefixes = {m.topic.split("/")[4]: m.payload[:7] for m in seen}
    assert prefixes == {"acme": b'{"v":1,', "globex": b'{"v":2,'}


async def test_wire_bytes_hold_no_exact_private_value(
        make_config: Callable[..., NetworkConfig], mosquitto: MosquittoBroker,
        pki: NetworkPKI, insight: Callable[..., MarketInsight]) -> None:
    """An outside subscriber with a valid certificate sees only ciphertext and ranges."""
    with probe(mosquitto, pki.node("initech"), subscribe=["pear/v1/#"]) as spy:
        async with PearNetwork(make_config("acme")) as tx:
            await tx.broadcast_market_insight(insight(price=7.654321, units=98765.0))
            await tx.flush(timeout=10)
        seen: list[Any] = []
        for part in ("/insights/", "/checkpoint/"):
            if not any(part in m.topic for m in seen):
                match, before = spy.expect(lambda m, p=part: p in m.topic)  # type: ignore[misc]
                seen += [*before, match]
        wire = b"".join(m.payload for m in seen)
    assert any(b'"enc"' in m.payload for m in seen if "/insights/" in m.topic)
    # (the member and node in topics and "from" are what the CA issued: pseudonyms in a real
    # anonymised consortium, the plain names in this test PKI)
    for secret in (b"7.654321", b"98765"):
        assert secret not in wire


async def test_late_joiner_sync_gets_every_retained_state(
        make_config: Callable[..., NetworkConfig], insight: Callable[..., MarketInsight]) -> None:
    n = 10_000
    async with PearNetwork(make_config("acme")) as tx:
        t0 = time.perf_counter()
        for i in range(n):
            await tx.broadcast_market_insight(insight(category=f"cat/c{i:05d}", price=1.0 + i))
        await tx.flush(timeout=120)
        publish_s = time.perf_counter() - t0
    async with PearNetwork(make_config("globex")) as late:
        started = time.perf_counter()
        result = await late.sync(timeout=120)
        elapsed = time.perf_counter() - started
        # Every state came from acme's checkpoint pages: one signature per page, not per state.
        assert late.status().states_from_checkpoints == n
    assert len(result) == n
    categories = {r.insight.category for r in result}
    assert categories == {f"cat/c{i:05d}" for i in range(n)}
    assert all(r.retained and r.member == "acme" for r in result)
    print(f"\npublish of {n} states: {publish_s:.2f} s; sync of {n}: {elapsed:.2f} s")


async def test_checkpoints_follow_updates_and_survive_a_publisher_restart(
        make_config: Callable[..., NetworkConfig], insight: Callable[..., MarketInsight]) -> None:
    """Updated states reach late joiners through refreshed pages; a restarted publisher reads
    its earlier states back before it sends a page, so no page loses them."""
    n = 300
    async with PearNetwork(make_config("acme")) as tx:
        for i in range(n):
            await tx.broadcast_market_insight(insight(category=f"cp/c{i:03d}", price=1.0))
        await tx.flush(timeout=60)
        for i in range(0, n, 30):  # 10 updates
            await tx.broadcast_market_insight(insight(category=f"cp/c{i:03d}", price=2.0))
        await tx.flush(timeout=60)
    async with PearNetwork(make_config("globex")) as late:
        result = await late.sync(timeout=60)
        assert late.status().states_from_checkpoints == n
    # Consortium shares prices as ranges: 1.0 and 2.0 fall in different buckets.
    prices = {r.insight.category: r.insight.groups["price_data"]["price"] for r in result}
    assert len(prices) == n
    assert sum(1 for p in prices.values() if 2.0 in p) == 10
    assert all(r.retained and r.member == "acme" and r.node == "store-1" for r in result)

    async with PearNetwork(make_config("acme")) as tx:
        await tx.broadcast_market_insight(insight(category="cp/c000", price=3.0))
        await tx.broadcast_market_insight(insight(category="cp/new", price=3.0))
        await tx.flush(timeout=60)
    async with PearNetwork(make_config("initech")) as late:
        result = await late.sync(timeout=60)
        status = late.status()
    assert len(result) == n + 1 and not status.dropped
    prices = {r.insight.category: r.insight.groups["price_data"]["price"] for r in result}
    assert 3.0 in prices["cp/c000"] and 3.0 in prices["cp/new"] and 1.0 in prices["cp/c001"]


async def test_sync_returns_promptly_when_nothing_is_retained(
        make_config: Callable[..., NetworkConfig]) -> None:
    async with PearNetwork(make_config("globex")) as net:
        result = await net.sync(timeout=5)
    assert len(result) == 0 and result.duration < 5


async def test_presence_and_last_will(make_config: Callable[..., NetworkConfig]) -> None:
    async with PearNetwork(make_config("globex")) as watcher:
        acme = PearNetwork(make_config("acme"))
        await acme.connect()
        await watcher.wait_peers(lambda ps: any(p.member == "acme" for p in ps), timeout=10)
        # Crash: the socket dies without DISCONNECT, so the broker publishes the will.
        assert acme.supervisor.connection is not None
        acme.supervisor.crash()
        await watcher.wait_peers(lambda ps: not any(p.member == "acme" for p in ps),
                                 timeout=15)
        await acme.disconnect()


async def test_reconnect_and_resubscribe_after_broker_restart(
        make_config: Callable[..., NetworkConfig], mosquitto: MosquittoBroker,
        insight: Callable[..., MarketInsight], take: Callable[..., Awaitable[list[Any]]]) -> None:
    async with PearNetwork(make_config("globex")) as rx, \
            PearNetwork(make_config("acme")) as tx:
        stream = rx.insights()
        await tx.broadcast_market_insight(insight(category="before"))
        await take(stream, 1)
        mosquitto.restart(kill=True)
        await tx.wait_connected(timeout=20)
        await rx.wait_connected(timeout=20)
        await tx.broadcast_market_insight(insight(category="after"))
        (got,) = await take(stream, 1)
        assert got.insight.category == "after"
        assert tx.status().reconnects >= 1 and rx.status().reconnects >= 1


async def test_outbox_survives_restart_with_zero_loss(
        make_config: Callable[..., NetworkConfig], tmp_path: Path,
        insight: Callable[..., MarketInsight], take: Callable[..., Awaitable[list[Any]]]) -> None:
    outbox = tmp_path / "outbox.sqlite"
    n = 300
    async with PearNetwork(make_config("globex")) as rx:
        stream = rx.insights()
        # The agent starts while its broker is unreachable: everything waits in the outbox.
        offline = PearNetwork(make_config("acme", broker_url=f"mqtts://127.0.0.1:{free_port()}",
                                          outbox=outbox))
        await offline.connect(wait=False)
        sent = {await offline.broadcast_market_insight(insight(price=1.0 + i,
                                                               product=f"sku-{i}"))
                for i in range(n)}
        assert offline.status().outbox_depth >= n
        await offline.disconnect()
        # A new process (same outbox file) reaches the broker and delivers all of it.
        async with PearNetwork(make_config("acme", outbox=outbox)) as online:
            got = await take(stream, n, timeout=30)
            await online.flush(timeout=10)
            assert online.status().outbox_depth == 0
    assert {g.item_id for g in got} == sent


async def test_hostile_payloads_are_dropped_and_counted(
        make_config: Callable[..., NetworkConfig], mosquitto: MosquittoBroker, pki: NetworkPKI,
        insight: Callable[..., MarketInsight], take: Callable[..., Awaitable[list[Any]]]) -> None:
    topic = "pear/v1/consortium/testnet/acme/insights/grocery/dairy"
    initech = pki.node("initech")
    forger = EnvelopeCodec(signer=Signer.from_files(key_file=initech.key, cert_file=initech.cert),
                           trust=TrustStore.from_files(ca_files=[pki.ca]))
    forged = forger.encode(kind="insights", body={"items": []})
    async with PearNetwork(make_config("globex")) as rx, \
            PearNetwork(make_config("acme")) as tx:
        stream = rx.insights()
        with probe(mosquitto, pki.node("acme", "evil")) as evil:
            for payload in (b"", b"\x00\xff garbage", b"{}", b'{"v":1}', b"[" * 10000,
                            json.dumps({"v": 3, "kind": "insights"}).encode(),
                            forged, b"x" * (1024 * 1024 + 1000)):
                evil.publish(topic, payload)
        await tx.broadcast_market_insight(insight(category="still/works"))
        (got,) = await take(stream, 1)
        assert got.insight.category == "still/works"
        dropped = rx.status().dropped
    assert sum(dropped.values()) >= 6
    assert dropped.get("identity_mismatch", 0) >= 1
    assert dropped.get("malformed", 0) >= 3
    assert dropped.get("oversized", 0) == 1 and dropped.get("unsupported_version", 0) >= 1


async def test_seed_usage_example(
        make_config: Callable[..., NetworkConfig], insight: Callable[..., MarketInsight]) -> None:
    """The design note's example, with a broker and certificates to talk to."""
    base = make_config("acme", mode=NetworkMode.PRIVATE)
    config = base.model_copy(update={"privacy": PrivacyConfig(
        anonymize_data=True, encrypt_connection=True,
        data_sharing={"price_data": "ranges_only", "sales_data": "aggregated",
                      "trends": "full"})})
    network = PearNetwork(config)
    await network.connect()
    await network.broadcast_market_insight(insight())
    await network.flush(timeout=10)
    state = await network.sync()
    status = network.status()
    await network.disconnect()
    assert status.connected and status.health.value == "ok" and status.messages_out >= 2
    assert len(state) == 0  # a node does not receive its own state back


async def test_seed_usage_example_verbatim_with_the_connection_in_the_environment(
        pki: NetworkPKI, mosquitto: MosquittoBroker, insight: Callable[..., MarketInsight],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The design note's example unchanged: the broker and certificates come only from
    PEAR_* variables; what the code sets (mode, company, privacy) wins over them."""
    certs = pki.node("example_company", "store-1")
    for name, value in {"BROKER_URL": mosquitto.tls_url, "NETWORK_ID": pki.network,
                        "NODE_ID": "store-1", "TLS__CA_FILE": str(certs.ca),
                        "TLS__CERT_FILE": str(certs.cert), "TLS__KEY_FILE": str(certs.key),
                        "PRIVACY__ANONYMIZE_DATA": "false"}.items():
        monkeypatch.setenv(f"PEAR_{name}", value)
    # Initialize network with configuration
    config = NetworkConfig(
        mode=NetworkMode.PRIVATE,
        company_id="example_company",
        privacy=PrivacyConfig(
            anonymize_data=True,
            encrypt_connection=True,
            data_sharing={
                "price_data": "ranges_only",
                "sales_data": "aggregated",
                "trends": "full"
            }
        )
    )
    network = PearNetwork(config)
    await network.connect()
    await network.broadcast_market_insight(insight())
    await network.sync()
    await network.flush(timeout=10)
    status = network.status()
    await network.disconnect()
    assert status.connected and status.insights_acknowledged == 1
    assert network.config.broker_url == mosquitto.tls_url
    assert network.config.privacy.anonymize_data is True  # the code's value, not the env's


async def test_status_reports_counters_and_latency(
        make_config: Callable[..., NetworkConfig], insight: Callable[..., MarketInsight],
        take: Callable[..., Awaitable[list[Any]]]) -> None:
    async with PearNetwork(make_config("globex")) as rx, \
            PearNetwork(make_config("acme")) as tx:
        stream = rx.insights()
        for i in range(50):
            await tx.broadcast_market_insight(insight(price=1.0 + i, product=f"sku-{i}"))
        await take(stream, 50)
        await tx.flush(timeout=10)
        st = tx.status()
        assert st.connected and st.messages_out >= 1 and st.latency_ms is not None
        assert st.outbox_depth == 0
        assert rx.status().messages_in >= 1
    assert tx.status().health.value == "down"


async def test_reconnects_after_a_broker_restart_are_spread_not_a_storm(
        make_config: Callable[..., NetworkConfig], mosquitto: MosquittoBroker,
        pki: NetworkPKI) -> None:
    """Every client of a restarting broker loses its connection at the same instant; the
    random first delay (up to reconnect_jitter) must spread the reconnects out."""
    n, spread = 24, 1.0
    nodes = [PearNetwork(make_config("acme", node=f"store-{i}", reconnect_jitter=spread,
                                     reconnect_min_delay=0.5, reconnect_max_delay=4.0))
             for i in range(n)]
    await asyncio.gather(*(node.connect() for node in nodes))
    try:
        mosquitto.restart(kill=True)
        await asyncio.gather(*(node.wait_disconnected(timeout=20) for node in nodes))
        await asyncio.gather(*(node.wait_connected(timeout=30) for node in nodes))
        times = sorted(node.status().connected_since.timestamp()  # type: ignore[union-attr]
                       for node in nodes)
    finally:
        await asyncio.gather(*(node.disconnect() for node in nodes))
    span = times[-1] - times[0]
    # Uniform over [0, 1 s]: all 24 inside 0.3 s happens with probability ~1e-11.
    assert span >= 0.3 * spread, f"reconnects within {span:.3f} s: a storm"
    busiest = max(sum(1 for t in times if s <= t < s + 0.05) for s in times)
    assert busiest <= n // 2, f"{busiest} of {n} reconnects within 50 ms"
    print(f"\n{n} reconnects spread over {span:.2f} s; at most {busiest} within 50 ms")


async def test_public_participant_reads_the_bridges_aggregates(
        make_config: Callable[..., NetworkConfig], mosquitto: MosquittoBroker,
        pki: NetworkPKI) -> None:
    from pear_mqtt.model.aggregates import (
        AggregateBody,
        PublishedCell,
        PublishedGroupBody,
        PublishedStatistic,
    )

    body = AggregateBody(
        network=pki.network, category="grocery/dairy", window_start=T0,
        window_end=T0 + timedelta(days=1), policy_version="test", min_companies=5,
        dominance_cap=0.25,
        cells=[PublishedCell(region="north", groups=[PublishedGroupBody(
            group="price_data", currency="EUR",
            fields={"price": PublishedStatistic(count=40, companies=6, mean=2.31)})])])
    bridge = EnvelopeCodec(signer=Signer.from_files(key_file=pki.bridge.key,
                                                    cert_file=pki.bridge.cert),
                           trust=TrustStore.from_files(ca_files=[pki.ca]))
    payload = bridge.encode(kind="aggregate", body=body.model_dump(mode="json"))
    topic = f"pear/v1/public/{pki.network}/aggregates/grocery/dairy"
    with probe(mosquitto, pki.bridge) as publisher:
        publisher.publish(topic, payload, retain=True)  # before the reader joins: retained
        async with PearNetwork(make_config("hooli", mode=NetworkMode.PUBLIC)) as reader:
            state = await reader.sync(timeout=10)
            stream = reader.aggregates()
            newer = body.model_copy(update={"policy_version": "test-2"})
            publisher.publish(topic, bridge.encode(kind="aggregate",
                                                   body=newer.model_dump(mode="json")),
                              retain=True)
            live = await asyncio.wait_for(anext(stream), 10)
    assert [a.aggregate for a in state.aggregates.values()] == [body]
    assert live.aggregate.policy_version == "test-2" and not live.retained
    assert live.aggregate.cells[0].groups[0].fields["price"].mean == 2.31


async def test_a_publish_the_broker_refuses_is_dead_lettered_not_retried(
        mosquitto: MosquittoBroker, pki: NetworkPKI,
        make_config: Callable[..., NetworkConfig], insight: Callable[..., MarketInsight],
        take: Callable[..., Awaitable[list[Any]]]) -> None:
    """An operator withdrew acme's right to per-category retained state (its live insights
    still pass): the refused state is dropped and counted by the broker's reason, and the
    outbox empties instead of sending it again for ever."""
    state = f"pear/v1/consortium/{pki.network}/acme/state/#"
    with mosquitto.acl_path.open("a", encoding="utf-8") as acl:
        acl.write(f"\nuser acme\ntopic deny {state}\n")
    await asyncio.to_thread(mosquitto.reload_and_wait)
    probe_topic = state.replace("#", "store-9/probe")
    probe = MqttProbe(host="localhost", port=mosquitto.tls_port, certs=pki.node("acme", "x"),
                      ca=pki.ca)
    try:
        assert not probe.connect().is_failure
        rc = probe.publish(probe_topic, b"x")
        assert rc is not None and rc.is_failure, "the reloaded ACL did not take effect"
    finally:
        probe.close()
    async with PearNetwork(make_config("acme", node="hq")) as rx:
        stream = rx.insights()
        async with PearNetwork(make_config("acme", node="store-2", state_topics=True)) as tx:
            await tx.broadcast_market_insight(insight(product="refused-state"))
            await tx.flush(timeout=15)  # would wait for ever on a state sent again and again
            status = tx.status()
        (got,) = await take(stream, 1)
    assert got.insight.product_id == "refused-state"
    assert status.outbox_depth == 0
    assert status.dropped.get("refused_not_authorized", 0) >= 1, status.dropped
