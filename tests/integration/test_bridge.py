"""The public bridge end to end: real consortium and public mosquitto brokers, real nodes.

Every test runs two brokers of the test network (``pki.network``): a consortium broker the
members publish to and a public broker the bridge publishes to. An independent subscriber on
``#`` of the public broker's plaintext listener (no ACL) captures every byte that reaches it.

The bridge's clock is a :class:`Clock` the test moves: inputs go into "yesterday's" daily
window, which becomes due (lag one day) only when the test moves the clock two days on. No
test sleeps to synchronise: it waits on the bridge's status or on a marker message.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
from bridgekit import (
    CAP,
    DAY,
    FAST,
    POLICY,
    WAIT,
    Clock,
    Input,
    K,
    Net,
    assert_nothing_individual,
    assert_same,
    cells_of,
    close_window,
    insight,
    number_pattern,
    publish,
    published,
    reference,
    wait,
    yesterday,
)
from brokers import GROUP_KEY, MqttProbe, Received, probe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pear_mqtt.bridge.admission import input_hash, item_digest
from pear_mqtt.bridge.config import DPConfig, SourceConfig
from pear_mqtt.bridge.output import verify_publication
from pear_mqtt.bridge.service import Bridge
from pear_mqtt.bridge.state import BridgeStore
from pear_mqtt.config.models import (
    EncryptionConfig,
    PrivacyConfig,
    default_sharing,
)
from pear_mqtt.errors import PearError
from pear_mqtt.model.aggregates import AggregateBody, LedgerBody, ReceiptBody
from pear_mqtt.model.insight import (
    NetworkMode,
    SharingLevel,
)
from pear_mqtt.model.topics import TopicScheme
from pear_mqtt.node.network import PearNetwork
from pear_mqtt.privacy.ranges import RangeScheme
from pear_mqtt.security import pki as pkimod
from pear_mqtt.security.envelope import EnvelopeCodec
from pear_mqtt.security.signing import Signer
from pear_mqtt.security.trust import TrustStore

# -- privacy and correctness ---------------------------------------------------------------

values6 = st.integers(min_value=100_000, max_value=999_999).map(lambda n: n / 1000)


@st.composite
def scenarios(draw: st.DrawFn) -> list[Input]:
    """Several categories, each with its own number of companies (some below k), stores
    and value scale (some with a dominant company)."""
    start = yesterday()
    inputs: list[Input] = []
    for c in range(draw(st.integers(2, 3))):
        category = f"cat{c}/x{uuid.uuid4().hex[:6]}"
        companies = draw(st.integers(3, 7))
        dominant = draw(st.booleans())
        for n in range(companies):
            scale = 40.0 if dominant and n == 0 else 1.0
            for s in range(draw(st.integers(1, 2))):
                hour = start + timedelta(hours=draw(st.integers(0, 22)))
                inputs.append(Input(
                    company=f"c{c}-{n}", store=f"store-{s + 1}",
                    insight=insight(category, start=hour, price=draw(values6),
                                    units=round(draw(values6) * scale, 3),
                                    revenue=draw(values6), change=draw(values6) / 100)))
    return inputs


@settings(max_examples=4, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(inputs=scenarios())
def test_aggregates_match_reference_and_nothing_individual_is_published(
        net: Net, inputs: list[Input]) -> None:
    run = uuid.uuid4().hex[:8]
    clock = Clock()

    async def scenario() -> list[Received]:
        async with Bridge(net.bridge_config(bridge_id=f"b{run}", state=f"{run}.sqlite"),
                          clock=clock) as bridge:
            await publish(net, inputs)
            await wait(bridge, lambda s: s.items_counted >= len(inputs))
            status = await close_window(bridge, clock)
            assert status.dropped == {}, status
        return net.marker()

    messages = asyncio.run(scenario())
    want = reference(net, inputs)
    got = published(messages, net.pki.network)
    categories = {i.insight.category for i in inputs}
    assert set(got) == {cat for cat, _ in want}  # a category with no publishable cell is absent
    for category in categories:
        cells = cells_of(got[category].payload) if category in got else {}
        assert set(cells) == {key for key in want if key[0] == category}
        for key, groups in cells.items():
            # (trends appear as statistics of the sealed price changes, never as a company's)
            assert_same(groups, want[key])
            for fields in groups.values():
                assert all(f["companies"] >= K for f in fields.values())
    # (the spy was subscribed already, so it saw them live: retained delivery to a late
    # reader is checked in test_public_reader_sees_only_aggregates_and_bridge_state)
    assert_nothing_individual(net, messages, inputs)


async def test_public_reader_sees_only_aggregates_and_bridge_state(net: Net) -> None:
    start = yesterday()
    inputs = [Input(company=f"c{n}", store="store-1",
                    insight=insight("grocery/dairy", start=start, price=1.5 + n,
                                    units=100.0 + n))
              for n in range(6)]
    clock = Clock()
    async with Bridge(net.bridge_config(), clock=clock) as bridge:
        await publish(net, inputs)
        await wait(bridge, lambda s: s.items_counted >= len(inputs))
        await close_window(bridge, clock)
    scheme = TopicScheme(mode="public", network=net.pki.network, member="reader")
    reader_certs = net.pki.node(net.member("reader"))
    with probe(net.public, reader_certs, subscribe=["#"]) as reader:
        # retained aggregate and receipt arrive; nothing else is readable
        agg, _ = reader.expect(scheme.aggregate("grocery/dairy"), timeout=WAIT)
        rec, before = reader.expect(scheme.bridge_receipt("grocery/dairy"), timeout=WAIT)
    assert agg.retain and rec.retain
    # (and the signed head of the bridge's history log, docs/HISTORY.md)
    bridge_log = TopicScheme(mode="public", network=net.pki.network,
                             member=net.pki.bridge_user).log_head("bridge")
    assert all("/aggregates/" in m.topic or "/state/bridge/" in m.topic
               or m.topic == bridge_log for m in before)
    body = AggregateBody.model_validate(json.loads(agg.payload)["body"])
    assert body.min_companies == K and body.dominance_cap == CAP and body.noise is None
    assert [c.region for c in body.cells] == ["north"]
    stats = {g.group: g.fields for g in body.cells[0].groups}
    assert stats["sales_data"]["units"].companies == 6
    assert stats["sales_data"]["units"].sum == pytest.approx(sum(100.0 + n for n in range(6)))


# -- receipts ---------------------------------------------------------------------------------

async def test_receipt_verifies_and_its_input_hash_can_be_recomputed_by_a_member(
        net: Net) -> None:
    start = yesterday()
    inputs = [Input(company=f"c{n}", store="store-1",
                    insight=insight("toys/lego", start=start, units=50.0 + n * 3))
              for n in range(5)]
    # A consortium member (here: an auditor's node) reads every item the bridge reads.
    auditor = net.pki.node(net.member("auditor"))
    clock = Clock()
    with probe(net.consortium, auditor,
               subscribe=[f"pear/v1/consortium/{net.pki.network}/+/insights/#"]) as seen:
        async with Bridge(net.bridge_config(), clock=clock) as bridge:
            await publish(net, inputs)
            await wait(bridge, lambda s: s.items_counted >= len(inputs))
            await close_window(bridge, clock)
        envelopes = [seen.messages.get(timeout=WAIT) for _ in inputs]
    messages = net.marker()
    scheme = TopicScheme(mode="public", network=net.pki.network, member="x")
    agg = next(m for m in messages if m.topic == scheme.aggregate("toys/lego"))
    rec = next(m for m in messages if m.topic == scheme.bridge_receipt("toys/lego"))

    auditor_codec = EnvelopeCodec(
        signer=Signer.from_files(key_file=auditor.key, cert_file=auditor.cert),
        trust=TrustStore.from_files(ca_files=[net.pki.ca], network=net.pki.network),
        encryption=EncryptionConfig(keys={"k1": GROUP_KEY}))
    body, receipt = verify_publication(aggregate_payload=agg.payload, receipt_payload=rec.payload,
                                       codec=auditor_codec)
    assert isinstance(receipt, ReceiptBody) and receipt.aggregate_topic == agg.topic
    (cell,) = receipt.cells
    assert (cell.region, cell.contributors, cell.inputs) == ("north", 5, 5)
    assert cell.epsilon_spent == 0 and receipt.mechanism == "none"
    assert receipt.policy_version == body.policy_version == bridge.config.policy_version()
    # the member recomputes the input hash from the items it received itself
    digests = []
    for env in envelopes:
        decoded = auditor_codec.decode(env.payload, check_replay=False)
        for item in decoded.message.body["items"]:
            digests.append(item_digest(network=net.pki.network, member=decoded.signer.member,
                                       item=item))
    assert input_hash(digests) == cell.input_hash

    # tampering with the aggregate breaks the binding
    forged = agg.payload.replace(b'"companies":5', b'"companies":6', 1)
    with pytest.raises(PearError, match=r"signature|another aggregate"):
        verify_publication(aggregate_payload=forged, receipt_payload=rec.payload,
                           codec=auditor_codec)


# -- fail closed on inputs ------------------------------------------------------------------

async def test_items_disclosing_more_than_the_policy_are_dropped_and_counted(
        net: Net) -> None:
    start = yesterday()
    good = [Input(company=f"c{n}", store="store-1",
                  insight=insight("home/garden", start=start, units=10.0 + n))
            for n in range(5)]
    clock = Clock()
    async with Bridge(net.bridge_config(), clock=clock) as bridge:
        await publish(net, good)
        # A member configured to share exact prices ("full") where the network says
        # aggregated: its items carry a number they should not.
        loud = net.node_config(net.member("loud"), levels={**POLICY,
                                                           "price_data": SharingLevel.FULL})
        async with PearNetwork(loud) as node:
            await node.broadcast_market_insight(insight("home/garden", start=start,
                                                        price=777.123, units=20.0))
            await node.flush(timeout=WAIT)
        # A member whose presence announces trends "none" but whose items carry them in
        # full: it disagrees with its own announcement.
        member = net.member("liar")
        honest = net.node_config(member, levels={**POLICY, "trends": SharingLevel.NONE})
        async with PearNetwork(honest):
            pass  # announces levels, then leaves (the will keeps the levels)
        liar = net.node_config(member)
        codec = EnvelopeCodec.from_config(liar)
        from pear_mqtt.privacy.filter import PrivacyFilter
        result = PrivacyFilter(config=liar).apply(
            insight("home/garden", start=start, units=30.0, change=5.5))
        from pear_mqtt.security.seal import load_x25519_public_key, seal
        # Nothing is published under this policy (the change follows the aggregated price):
        # the item is its sealed part alone, with a trend field the liar announced as none.
        assert result.shared is None and result.contribution is not None
        assert "trends" in result.contribution.values
        item = {"iid": uuid.uuid4().hex,
                "sealed": seal(load_x25519_public_key(net.pub_file),
                               result.contribution.model_dump_json().encode())}
        scheme = TopicScheme(mode="consortium", network=net.pki.network, member=member)
        with probe(net.consortium, net.pki.node(member)) as p:
            await wait(bridge, lambda s: (member, "store-1") in _presences(bridge))
            p.publish(scheme.insights("home/garden"),
                      codec.encode(kind="insights", body={"items": [item]}))
        status = await wait(bridge, lambda s: s.dropped.get("policy_violation", 0) >= 1
                            and s.dropped.get("presence_mismatch", 0) >= 1
                            and s.items_counted >= len(good))
        assert status.items_counted == len(good)
        await close_window(bridge, clock)
    messages = net.marker()
    got = published(messages, net.pki.network)
    (cell,) = cells_of(got["home/garden"].payload).values()
    assert cell["sales_data"]["units"]["companies"] == 5  # the two offenders are not in it
    assert cell["sales_data"]["units"]["sum"] == pytest.approx(sum(10.0 + n for n in range(5)))
    assert number_pattern(777.123).search(b"".join(m.payload for m in messages)) is None


async def test_a_re_sent_and_re_read_observation_counts_once_with_its_latest_values(
        net: Net) -> None:
    """A company sends the same observation twice, then (as ``agent --watch`` re-reading a
    changed file, from a new process) again with other values: the bridge replaces the
    earlier copies, and the aggregate counts the company once, with the latest values."""
    start = yesterday()
    others = [Input(company=f"o{n}", store="store-1",
                    insight=insight("resent/cat", start=start, units=200.0, price=2.0))
              for n in range(4)]
    first = insight("resent/cat", start=start, units=100.0, price=1.0)
    reread = insight("resent/cat", start=start, units=150.0, price=1.5)
    config = net.node_config(net.member("resender"))
    clock = Clock()
    async with Bridge(net.bridge_config(), clock=clock) as bridge:
        await publish(net, others)
        async with PearNetwork(config) as node:
            ids = {await node.broadcast_market_insight(first) for _ in range(2)}
            await node.flush(timeout=WAIT)
        async with PearNetwork(config) as node:  # a new process reading the file again
            ids.add(await node.broadcast_market_insight(reread))
            await node.flush(timeout=WAIT)
        assert len(ids) == 1
        status = await wait(bridge, lambda s: s.items_counted >= len(others) + 1
                            and s.replaced >= 2)
        assert (status.items_counted, status.replaced, status.open_items) == (5, 2, 5)
        assert status.dropped == {}
        await close_window(bridge, clock)
    (cell,) = cells_of(published(net.marker(), net.pki.network)["resent/cat"].payload).values()
    units = cell["sales_data"]["units"]
    assert (units["companies"], units["count"]) == (5, 5)
    assert units["sum"] == pytest.approx(4 * 200.0 + 150.0)
    assert cell["price_data"]["price"]["mean"] == pytest.approx((4 * 2.0 + 1.5) / 5)


def _presences(bridge: Bridge) -> set[tuple[str, str]]:
    return {key for link in bridge.inputs for key in link.presence}


async def test_below_k_and_dominant_cells_are_absent_and_counted(net: Net) -> None:
    start = yesterday()
    inputs = (
        # four companies: below k
        [Input(company=f"few{n}", store="store-1",
               insight=insight("few/cat", start=start, units=100.0)) for n in range(4)]
        # six companies, one with 60 % of the units: dominance
        + [Input(company=f"dom{n}", store="store-1",
                 insight=insight("dom/cat", start=start, units=900.0 if n == 0 else 120.0))
           for n in range(6)])
    clock = Clock()
    async with Bridge(net.bridge_config(), clock=clock) as bridge:
        await publish(net, inputs)
        await wait(bridge, lambda s: s.items_counted >= len(inputs))
        status = await close_window(bridge, clock)
    assert published(net.marker(), net.pki.network) == {}
    assert status.suppressed.get("below_k", 0) >= 1
    assert status.suppressed.get("dominance", 0) >= 1
    assert status.cells_published == 0


# -- restart ---------------------------------------------------------------------------------

async def test_restart_mid_window_loses_and_duplicates_nothing(net: Net) -> None:
    start = yesterday()
    first = [Input(company=f"c{n}", store="store-1",
                   insight=insight("bev/soda", start=start + timedelta(hours=n),
                                   units=100.0 + n, price=1.0 + n / 10)) for n in range(3)]
    second = [Input(company=f"c{n}", store="store-1",
                    insight=insight("bev/soda", start=start + timedelta(hours=n),
                                    units=200.0 + n, price=2.0 + n / 10)) for n in range(3, 6)]
    clock = Clock()
    config = net.bridge_config(bridge_id="restart")
    topic_filter = f"pear/v1/consortium/{net.pki.network}/+/insights/#"
    with probe(net.consortium, subscribe=[topic_filter]) as capture:
        async with Bridge(config, clock=clock) as bridge:
            await publish(net, first)
            await wait(bridge, lambda s: s.items_counted >= len(first))
        # Down mid-window: the broker keeps the bridge's session and queues for it.
        await publish(net, second)
        replay = capture.messages.get(timeout=WAIT)  # an envelope bridge one counted
        member = replay.topic.split("/")[4]
        with probe(net.consortium, net.pki.node(member)) as p:
            p.publish(replay.topic, replay.payload)  # delivered again after the restart
    async with Bridge(config, clock=clock) as bridge:
        status = await wait(bridge, lambda s: s.items_counted >= len(second)
                            and s.duplicates >= 1)
        assert status.items_counted == len(second) and status.duplicates == 1
        assert status.open_items == len(first) + len(second)
        await close_window(bridge, clock)
    messages = net.marker()
    got = published(messages, net.pki.network)
    (cell,) = cells_of(got["bev/soda"].payload).values()
    assert_same(cell, reference(net, first + second)[("bev/soda", "north")])
    assert cell["sales_data"]["units"]["count"] == 6

    # A third run neither publishes the window again nor lets a late item in.
    async with Bridge(config, clock=clock) as bridge:
        assert bridge.status().windows_published == 1
        await publish(net, [Input(company="c0", store="store-1",
                                  insight=insight("bev/soda", start=start, units=5.0))])
        status = await wait(bridge, lambda s: s.dropped.get("late", 0) >= 1)
        ticks = status.ticks
        await wait(bridge, lambda s: s.ticks >= ticks + 3)
        assert bridge.status().messages_published == 0
    assert published(net.marker(), net.pki.network) == {}


# -- public contributions and private sources ------------------------------------------------

async def test_public_contributions_are_aggregated_under_the_same_rules(net: Net) -> None:
    start = yesterday()
    inputs = [Input(company=f"p{n}", store="store-1",
                    insight=insight("public/cat", start=start, price=3.0 + n * n / 7,
                                    units=40.0 + n * n * 1.3)) for n in range(5)]
    few = [Input(company=f"q{n}", store="store-1",
                 insight=insight("public/few", start=start, units=40.0)) for n in range(3)]
    clock = Clock()
    async with Bridge(net.bridge_config(consortium=False, contributions=True),
                      clock=clock) as bridge:
        await publish(net, inputs + few, mode=NetworkMode.PUBLIC)
        await wait(bridge, lambda s: s.items_counted >= len(inputs) + len(few))
        await close_window(bridge, clock)
    messages = net.marker()
    got = published(messages, net.pki.network)
    assert set(got) == {"public/cat"}
    (cell,) = cells_of(got["public/cat"].payload).values()
    assert_same(cell, reference(net, inputs)[("public/cat", "north")])
    assert_nothing_individual(net, messages, inputs + few)


async def test_private_source_merges_with_its_consortium_identity(net: Net) -> None:
    """A company that opted in with its private broker counts once, not twice."""
    start = yesterday()
    five = [Input(company=f"m{n}", store="store-1",
                  insight=insight("merge/cat", start=start, units=100.0 + n))
            for n in range(5)]
    # m0's private network: same company, exact data from another store.
    private_member = net.member("m0")
    private = SourceConfig(
        mode="private", network_id=net.pki.network, broker_url=net.consortium.tls_url,
        tls=net.pki.tls(net.pki.bridge), company_id=private_member,
        domain=net.pki.network, member=private_member, reliability=FAST)
    clock = Clock()
    async with Bridge(net.bridge_config(private=[private]), clock=clock) as bridge:
        await publish(net, five)
        async with PearNetwork(net.node_config(private_member, node="store-9",
                                               mode=NetworkMode.PRIVATE)) as node:
            # private default: everything full, which an opted-in private source aggregates
            await node.broadcast_market_insight(insight("merge/cat", start=start, units=15.0))
            await node.flush(timeout=WAIT)
        status = await wait(bridge, lambda s: s.items_counted >= 6)
        assert status.sources == {f"consortium:{net.pki.network}": True,
                                  f"private:{private_member}": True}
        await close_window(bridge, clock)
    got = published(net.marker(), net.pki.network)
    (cell,) = cells_of(got["merge/cat"].payload).values()
    units = cell["sales_data"]["units"]
    # Five companies, six contributions: m0's private store is m0, not a sixth company.
    assert (units["companies"], units["count"]) == (5, 6)
    assert units["sum"] == pytest.approx(sum(100.0 + n for n in range(5)) + 15.0)


async def test_certificate_pseudonyms_count_each_company_once(net: Net) -> None:
    """Members enrolled under the CA's pseudonyms count once per company (a company's two
    stores are one company), and a company's private broker, where it is named by its own id,
    merges with its consortium pseudonym through the source's ``domain``/``member`` (from the
    operator's pseudonym registry)."""
    start = yesterday()
    names = [f"e{n}{uuid.uuid4().hex[:8]}" for n in range(5)]
    stores = {names[0]: ("store-1", "store-2")}
    # names[0]: 40 per store, x 2, + 20 privately; no company above the 25 % cap, and no
    # statistic equal to an input
    units = dict(zip(names, (40.0, 101.5, 117.25, 98.75, 133.0), strict=True))
    inputs = [Input(company=c, store=s, insight=insight("pseud/cat", start=start,
                                                        units=units[c]))
              for c in names for s in stores.get(c, ("store-1",))]
    own_id = names[0]
    for i in inputs:  # the operator enrols every store
        net.pki.enrolled(i.company, i.store)
    # The bridge's operator looks the company's consortium pseudonym up in the registry.
    registry = {e.company: e.member for e in pkimod.list_pseudonyms(ca_dir=net.pki.ca_dir)}
    private = SourceConfig(
        mode="private", network_id=net.pki.network, broker_url=net.consortium.tls_url,
        tls=net.pki.tls(net.pki.bridge), company_id=own_id, domain=net.pki.network,
        member=registry[own_id], reliability=FAST)
    clock = Clock()
    async with Bridge(net.bridge_config(private=[private]), clock=clock) as bridge:
        for i in inputs:
            async with PearNetwork(net.enrolled_config(i.company, store=i.store)) as node:
                assert node.identity.member == registry[i.company] != i.company
                await node.broadcast_market_insight(i.insight)
                await node.flush(timeout=WAIT)
        async with PearNetwork(net.node_config(own_id, node="store-9",
                                               mode=NetworkMode.PRIVATE)) as node:
            await node.broadcast_market_insight(insight("pseud/cat", start=start, units=20.0))
            await node.flush(timeout=WAIT)
        await wait(bridge, lambda s: s.items_counted >= len(inputs) + 1)
        await close_window(bridge, clock)
    messages = net.marker()
    (cell,) = cells_of(published(messages, net.pki.network)["pseud/cat"].payload).values()
    got = cell["sales_data"]["units"]
    assert (got["companies"], got["count"]) == (5, len(inputs) + 1)
    assert got["sum"] == pytest.approx(40.0 * 2 + 20.0 + 101.5 + 117.25 + 98.75 + 133.0)
    assert_nothing_individual(net, messages, inputs)


async def test_a_revoked_members_items_are_dropped_by_a_bridge_holding_the_crl(
        net: Net) -> None:
    """The bridge checks signers against the CA's CRL (re-read when it changes): a member
    revoked after the bridge started is dropped as ``revoked``, while the broker, not yet
    told, still lets its open connection publish."""
    start = yesterday()
    names = [f"r{n}{uuid.uuid4().hex[:8]}" for n in range(6)]
    base = net.bridge_config()
    assert base.consortium is not None
    tls = base.consortium.tls.model_copy(update={"crl_file": net.pki.crl,
                                                 "crl_check_interval": 0})
    config = base.model_copy(update={
        "consortium": base.consortium.model_copy(update={"tls": tls})})
    clock = Clock()
    async with Bridge(config, clock=clock) as bridge, \
            PearNetwork(net.enrolled_config(names[0])) as lost:
        pkimod.revoke(ca_dir=net.pki.ca_dir, cert=net.pki.enrolled(names[0])[0].cert)
        await lost.broadcast_market_insight(insight("crl/cat", start=start, units=999.0))
        await lost.flush(timeout=WAIT)
        for n, name in enumerate(names[1:]):
            async with PearNetwork(net.enrolled_config(name)) as node:
                await node.broadcast_market_insight(insight("crl/cat", start=start,
                                                            units=100.0 + n * n))
                await node.flush(timeout=WAIT)
        status = await wait(bridge, lambda s: s.items_counted >= 5
                            and s.dropped.get("revoked", 0) >= 1)
        assert status.items_counted == 5
        await close_window(bridge, clock)
    (cell,) = cells_of(published(net.marker(), net.pki.network)["crl/cat"].payload).values()
    units = cell["sales_data"]["units"]
    assert (units["companies"], units["count"]) == (5, 5)
    assert units["sum"] == pytest.approx(sum(100.0 + n * n for n in range(5)))


# -- noise and the ε ledger ------------------------------------------------------------------

async def test_budget_exhaustion_suppresses_instead_of_publishing_without_noise(
        net: Net) -> None:
    start = yesterday()
    inputs = [Input(company=f"c{n}", store="store-1",
                    insight=insight(f"dp/cat{c}", start=start, units=1000.0 + 10 * n))
              for c in range(3) for n in range(5)]
    dp = DPConfig(mechanism="laplace", epsilon_per_cell=1.0, budget_per_period=2.0,
                  period_seconds=30 * DAY, bounds={"sales_data.units": (0.0, 2000.0)})
    clock = Clock()
    async with Bridge(net.bridge_config(dp=dp), clock=clock) as bridge:
        await publish(net, inputs)
        await wait(bridge, lambda s: s.items_counted >= len(inputs))
        status = await close_window(bridge, clock)
    assert status.suppressed.get("budget", 0) == 1  # one field of the third cell
    assert sum(status.epsilon_spent.values()) == pytest.approx(2.0)
    messages = net.marker()
    got = published(messages, net.pki.network)
    assert set(got) == {"dp/cat0", "dp/cat1"}
    for category in got:
        body = AggregateBody.model_validate(json.loads(got[category].payload)["body"])
        assert body.noise is not None and body.noise.mechanism == "laplace"
        units = body.cells[0].groups[0].fields["units"]
        assert units.stddev is None and units.companies == 5
        assert 0.0 <= units.mean <= 2000.0
        exact = sum(1000.0 + 10 * n for n in range(5)) / 5
        assert units.mean != exact  # noised (a tie has probability zero)
    scheme = TopicScheme(mode="public", network=net.pki.network, member="x")
    ledger_msg = [m for m in messages if m.topic == scheme.bridge_state("ledger")][-1]
    ledger = LedgerBody.model_validate(json.loads(ledger_msg.payload)["body"])
    (period,) = ledger.periods
    assert (period.epsilon_spent, period.epsilon_remaining, period.cells) == (2.0, 0.0, 2)
    receipts = [ReceiptBody.model_validate(json.loads(m.payload)["body"]) for m in messages
                if m.topic.startswith(f"pear/v1/public/{net.pki.network}/state/bridge/receipts/")]
    assert sorted(r.cells[0].epsilon_spent for r in receipts) == [1.0, 1.0]


async def test_throughput(net: Net) -> None:
    """Figures for the report: items/s the bridge verifies, opens, checks and counts."""
    start = yesterday()
    per_company = 400
    clock = Clock()
    async with Bridge(net.bridge_config(), clock=clock) as bridge:
        inputs = [Input(company=f"c{n}", store="store-1",
                        insight=insight(f"tp/c{i % 8}", start=start + timedelta(hours=i % 23),
                                        units=float(i + 1), price=1.0 + i / 1000,
                                        product=f"sku-{i}"))
                  for n in range(5) for i in range(per_company)]
        began = time.perf_counter()
        await publish(net, inputs)
        status = await wait(bridge, lambda s: s.items_counted >= len(inputs), timeout=120)
        elapsed = time.perf_counter() - began
        t0 = time.perf_counter()
        await close_window(bridge, clock)
        closing = time.perf_counter() - t0
    assert status.items_counted == len(inputs)
    print(f"\nbridge: {len(inputs)} items counted, end to end {len(inputs) / elapsed:.0f}/s "
          f"(bridge-side rate {status.items_per_second}/s); window close + publish "
          f"{closing * 1000:.0f} ms")
    assert math.isfinite(elapsed)


async def test_a_window_closed_during_an_outage_is_sent_later_byte_for_byte(net: Net) -> None:
    """Closing a window writes its messages (with their noise) to the outbox in the same
    transaction that spends the budget; a crash before the public broker acknowledged them
    re-sends the same bytes rather than aggregating again with fresh noise."""
    start = yesterday()
    inputs = [Input(company=f"c{n}", store="store-1",
                    insight=insight("outage/cat", start=start, units=500.0 + 7 * n))
              for n in range(5)]
    dp = DPConfig(mechanism="laplace", epsilon_per_cell=1.0, budget_per_period=5.0,
                  bounds={"sales_data.units": (0.0, 1000.0)})
    config = net.bridge_config(dp=dp, bridge_id="outage")
    clock = Clock()
    bridge = Bridge(config, clock=clock)
    await bridge.start()
    try:
        await publish(net, inputs)
        await wait(bridge, lambda s: s.items_counted >= len(inputs))
        net.public.kill()
        await wait(bridge, lambda s: not s.public_connected)
        clock.advance(2 * DAY + 1)
        bridge.poke()
        status = await wait(bridge, lambda s: s.windows_open == 0 and s.outbox_depth == 3)
        assert status.windows_published == 0 and status.epsilon_spent  # budget already spent
    finally:
        await bridge.stop(drain=False)  # as a crash would: nothing more is sent
    store = BridgeStore(config.state_path)
    try:
        pending = {row.topic: row.payload for row in store.pending()}
    finally:
        store.close()
    net.public.start()
    with probe(net.public, subscribe=["#"]) as spy:
        async with Bridge(config, clock=clock) as again:
            await wait(again, lambda s: s.outbox_depth == 0 and s.windows_published == 1)
            assert again.status().epsilon_spent == status.epsilon_spent  # spent once
        scheme = TopicScheme(mode="public", network=net.pki.network, member="x")
        for topic in (scheme.aggregate("outage/cat"), scheme.bridge_receipt("outage/cat"),
                      scheme.bridge_state("ledger")):
            msg, _ = spy.expect(topic, timeout=WAIT)
            assert msg.payload == pending[topic]


# -- the consortium's own aggregates and price histograms -------------------------------------

NOT_AUTHORIZED = 0x87


def consortium_marker(net: Net, spy: MqttProbe) -> list[Received]:
    """Everything ``spy`` (on the consortium broker's aggregates) received so far, proved
    complete by a marker published after it (on the plaintext listener, which has no ACL)."""
    topic = f"pear/v1/consortium/{net.pki.network}/aggregates/spy/{uuid.uuid4().hex}"
    with probe(net.consortium) as p:
        p.publish(topic, b"marker")
    _, before = spy.expect(topic, timeout=WAIT)
    return before


def histograms_of(body: AggregateBody) -> dict[str, Any]:
    return {c.region: [h.model_dump(mode="json") for h in c.histograms or ()]
            for c in body.cells}


async def test_price_histograms_reach_the_consortium_first_then_the_public(net: Net) -> None:
    """Under the default consortium policy prices are ranges_only (buckets, nothing sealed):
    the bridge counts each company's latest bucket per cell and publishes the histogram with
    k companies or more — to the consortium's members after the consortium lag (a member
    node receives it through aggregates() and sync()), and the same one to the public after
    the publication lag. A cell of fewer than k companies yields nothing on either side."""
    levels = default_sharing(NetworkMode.CONSORTIUM)
    assert levels["price_data"] is SharingLevel.RANGES_ONLY
    start = yesterday()
    prices = [1.05, 1.1, 1.2, 1.6, 1.7, 2.6]  # none a bucket edge (those are public)
    inputs = [Input(company=f"h{n}", store="store-1",
                    insight=insight("fruit/apples", start=start + timedelta(hours=n + 1),
                                    price=p)) for n, p in enumerate(prices)]
    # h0's other store saw 9.0 earlier in the window: the company counts once, latest bucket
    inputs.append(Input(company="h0", store="store-2",
                        insight=insight("fruit/apples", start=start, price=9.0)))
    few = [Input(company=f"f{n}", store="store-1",
                 insight=insight("fruit/pears", start=start, price=1.01 + n / 10))
           for n in range(K - 1)]
    ranges = RangeScheme.from_config(PrivacyConfig())
    counts: dict[tuple[float | None, float | None], int] = {}
    for p in prices:
        b = ranges.bucket(p, category="fruit/apples")
        counts[(b.lo, b.hi)] = counts.get((b.lo, b.hi), 0) + 1
    want = [{"lo": lo, "hi": hi, "companies": n} for (lo, hi), n in sorted(counts.items())]
    median = ranges.bucket(sorted(prices)[2], category="fruit/apples")

    config = net.bridge_config(sharing=levels, consortium_output=True, active="k1",
                               consortium_lag_seconds=DAY, publication_lag_seconds=3 * DAY)
    ours = TopicScheme(mode="consortium", network=net.pki.network, member="x")
    theirs = TopicScheme(mode="public", network=net.pki.network, member="x")
    clock = Clock()
    with probe(net.consortium, subscribe=[ours.aggregates_filter(),
                                          ours.consortium_receipt("fruit/apples")]) as cspy:
        async with Bridge(config, clock=clock) as bridge, \
                PearNetwork(net.node_config(net.member("reader"), levels=levels)) as member:
            stream = member.aggregates()
            first = asyncio.ensure_future(anext(stream))
            await publish(net, [*inputs, *few], levels=levels)
            await wait(bridge, lambda s: s.items_counted >= len(inputs) + len(few))
            clock.advance(2 * DAY + 1)  # past the consortium lag, not the public one
            bridge.poke()
            received = await asyncio.wait_for(first, WAIT)
            # (the probe blocks: ask it only once the message is known to be there)
            cmsg, _ = cspy.expect(ours.consortium_aggregate("fruit/apples"), timeout=WAIT)
            assert b'"enc"' in cmsg.payload  # under the group key, like all else there
            # ... with its receipt, which a member verifies with what its config holds
            crec, _ = cspy.expect(ours.consortium_receipt("fruit/apples"), timeout=WAIT)
            member_codec = EnvelopeCodec(
                signer=Signer.from_files(key_file=net.pki.bridge.key,
                                         cert_file=net.pki.bridge.cert),
                trust=TrustStore.from_files(ca_files=[net.pki.ca], network=net.pki.network),
                encryption=EncryptionConfig(keys={"k1": GROUP_KEY}))
            _, creceipt = verify_publication(aggregate_payload=cmsg.payload,
                                             receipt_payload=crec.payload, codec=member_codec)
            assert creceipt.cells[0].contributors == 6 and creceipt.mechanism == "none"
            assert received.topic == cmsg.topic
            got = received.aggregate
            assert got.network == net.pki.network and got.min_companies == K
            (cell,) = got.cells
            assert cell.groups == []  # prices only as buckets: no mean, nothing sealed
            (hist,) = cell.histograms or ()
            assert (hist.field, hist.currency, hist.companies) == ("price", "EUR", 6)
            assert [b.model_dump(mode="json") for b in hist.buckets] == want
            assert (hist.median.lo, hist.median.hi) == (median.lo, median.hi)
            synced = await member.sync()
            assert synced.aggregates[received.topic].aggregate == got
            # nothing public yet
            assert not [m for m in net.marker() if "/aggregates/" in m.topic]
            assert bridge.status().windows_published == 0
            # the window is fixed now: what comes later is dropped, so the public gets
            # exactly what the consortium got (no difference to learn a company from)
            await publish(net, [Input(company="h9", store="store-1", insight=insight(
                "fruit/apples", start=start + timedelta(hours=3), price=5.0))], levels=levels)
            await wait(bridge, lambda s: s.dropped.get("late") == 1)
            clock.advance(2 * DAY)
            bridge.poke()
            await wait(bridge, lambda s: s.windows_published == 1 and s.outbox_depth == 0)
        # one consortium aggregate in all: none for the pears, none again for the apples
        assert consortium_marker(net, cspy) == []
    messages = net.marker()
    public = published(messages, net.pki.network)
    assert set(public) == {"fruit/apples"}
    receipt = next(m for m in messages if m.topic == theirs.bridge_receipt("fruit/apples"))
    codec = EnvelopeCodec(signer=Signer.from_files(key_file=net.pki.bridge.key,
                                                   cert_file=net.pki.bridge.cert),
                          trust=TrustStore.from_files(ca_files=[net.pki.ca],
                                                      network=net.pki.network))
    body, rec = verify_publication(aggregate_payload=public["fruit/apples"].payload,
                                   receipt_payload=receipt.payload, codec=codec)
    assert histograms_of(body) == histograms_of(got)  # the same signal, later
    assert rec.cells[0].contributors == 6
    assert_nothing_individual(net, messages, [*inputs, *few])


async def test_a_member_cannot_publish_on_the_consortium_aggregates_topic(net: Net) -> None:
    scheme = TopicScheme(mode="consortium", network=net.pki.network, member="x")
    topics = [scheme.consortium_aggregate("fruit/apples"),
              scheme.consortium_receipt("fruit/apples")]
    with probe(net.consortium, subscribe=[scheme.aggregates_filter(), topics[1]]) as spy:
        with probe(net.consortium, net.pki.node(net.member("intruder"))) as intruder:
            for topic in topics:
                rc = intruder.publish(topic, b"forged", retain=True)
                assert rc is not None and rc.value == NOT_AUTHORIZED, (topic, rc)
        with probe(net.consortium, net.pki.bridge) as bridge:
            for topic in topics:
                rc = bridge.publish(topic, b"", retain=True)  # the bridge may (clears nothing)
                assert rc is not None and not rc.is_failure, (topic, rc)
        assert [m.payload for m in consortium_marker(net, spy)] == [b"", b""]
