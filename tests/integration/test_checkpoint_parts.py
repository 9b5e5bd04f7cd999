"""Checkpoint pages over one message go in parts, against a real mosquitto over mutual TLS:
with a small ``max_message_bytes`` a few hundred states overflow their pages, and late
joiners, a restarting node and a node whose pages shrink again all end with every state
and no stale part; a part forged by another node of the member is refused."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from brokerkinds import BrokerUnderTest
from brokers import MosquittoBroker, NetworkPKI, probe

from pear_mqtt.config.models import NetworkConfig
from pear_mqtt.model.insight import MarketInsight
from pear_mqtt.model.topics import CHECKPOINT_PAGES, TopicScheme, parse_topic
from pear_mqtt.node.network import PearNetwork
from pear_mqtt.node.records import SyncResult
from pear_mqtt.security.envelope import EnvelopeCodec

SMALL = 8192  # max_message_bytes: ~6 states of a consortium page per message
PAGES = (0x10, 0x11)  # the states of these tests all land on these two pages


def _page_of(pki: NetworkPKI, category: str) -> int:
    """The page of acme store-1's state of ``category``: crc32(topic) mod 256 (DESIGN.md)."""
    acme = TopicScheme(mode="consortium", network=pki.network, member="acme")
    return zlib.crc32(acme.state("store-1", category).encode()) % CHECKPOINT_PAGES


def _categories(pki: NetworkPKI, count: int, prefix: str) -> list[str]:
    """``count`` categories whose state topics of acme's store-1 are on :data:`PAGES`."""
    out: list[str] = []
    i = 0
    while len(out) < count:
        category = f"{prefix}/c{i:05d}"
        if _page_of(pki, category) in PAGES:
            out.append(category)
        i += 1
    return out


def _retained(mosquitto: MosquittoBroker, pki: NetworkPKI, topic_filter: str) -> list[Any]:
    """Every retained message on ``topic_filter`` now, as a plain MQTT client reads it."""
    marker = TopicScheme(mode="consortium", network=pki.network,
                         member="initech").sync_marker("probe")
    with probe(mosquitto, pki.node("initech", "probe"), subscribe=[topic_filter, marker]) as p:
        p.publish(marker, b"end")
        _end, before = p.expect(marker)
    return [m for m in before if m.retain and m.payload]


def _parts(mosquitto: MosquittoBroker, pki: NetworkPKI) -> dict[tuple[int, int], Any]:
    """acme store-1's retained checkpoint messages by (page, part)."""
    acme = TopicScheme(mode="consortium", network=pki.network, member="acme")
    held = _retained(mosquitto, pki, acme.node_checkpoint_filter("store-1"))
    out = {}
    for m in held:
        parsed = parse_topic(m.topic)
        assert parsed.page is not None
        out[(parsed.page, parsed.part)] = m
    return out


def _prices(result: SyncResult) -> dict[str, Any]:
    """Category -> the price (a bucket, ``in`` tells) of each state ``result`` holds."""
    out = {}
    for r in result:
        assert r.member == "acme" and r.node == "store-1"
        out[r.insight.category] = r.insight.groups["price_data"]["price"]
    return out


def _holds(result: SyncResult, expected: dict[str, float]) -> None:
    """``result`` holds a state of exactly the categories of ``expected``, at those prices."""
    prices = _prices(result)
    assert set(prices) == set(expected)
    wrong = {c: prices[c] for c, price in expected.items() if price not in prices[c]}
    assert not wrong, f"{len(wrong)} states at an older price, e.g. {next(iter(wrong.items()))}"


def _priced(item: dict[str, Any], price: float) -> dict[str, Any]:
    """A state item (as a page carries it) at another price bucket."""
    shared = item["insight"]
    groups = shared["groups"]
    return {**item, "insight": {**shared, "groups": {**groups, "price_data": {
        **groups["price_data"], "price": {"lo": price - 1000.0, "hi": price + 1000.0}}}}}


async def _publish(net: PearNetwork, insight: Callable[..., MarketInsight],
                   categories: list[str], price: float) -> None:
    await net.broadcast_many([insight(category=c, price=price) for c in categories])
    await net.flush(timeout=60)


async def _late_sync(make_config: Callable[..., NetworkConfig], member: str,
                     node: str = "store-1") -> tuple[SyncResult, dict[str, int]]:
    async with PearNetwork(make_config(member, node=node)) as late:
        result = await late.sync(timeout=30)
        return result, dict(late.status().dropped)


async def test_pages_over_one_message_go_in_parts_to_late_joiners_and_back_to_the_node(
        make_config: Callable[..., NetworkConfig], mosquitto: MosquittoBroker, pki: NetworkPKI,
        insight: Callable[..., MarketInsight], tmp_path: Path) -> None:
    n = 300
    categories = _categories(pki, n, "pp")
    outbox = tmp_path / "acme.sqlite"
    async with PearNetwork(make_config("acme", outbox=outbox,
                                       max_message_bytes=SMALL)) as tx:
        await _publish(tx, insight, categories, 1.5)
        status = tx.status()
    assert status.outbox_depth == 0 and not status.dropped  # checkpoint_oversized among them
    parts = await asyncio.to_thread(_parts, mosquitto, pki)
    assert {page for page, _part in parts} == set(PAGES)
    assert max(part for _page, part in parts) >= 10  # ~150 states a page, ~6 a part
    assert all(len(m.payload) <= SMALL for m in parts.values())
    result, dropped = await _late_sync(make_config, "globex")
    assert not dropped and not result.missing_pages
    _holds(result, dict.fromkeys(categories, 1.5))

    # A restart (the same limit) reads every part back: a new state on each page re-sends
    # it, which must still carry all the others.
    more = _categories(pki, n + 40, "pp")[n:]
    extra = [next(c for c in more if _page_of(pki, c) == page) for page in PAGES]
    async with PearNetwork(make_config("acme", outbox=outbox,
                                       max_message_bytes=SMALL)) as tx:
        await _publish(tx, insight, extra, 250.0)
        assert not tx.status().dropped
    result, dropped = await _late_sync(make_config, "initech")
    assert not dropped and not result.missing_pages
    _holds(result, {**dict.fromkeys(categories, 1.5), **dict.fromkeys(extra, 250.0)})


async def test_parts_reach_late_joiners_and_a_restarted_node_on_every_broker_kind(
        broker_kind: BrokerUnderTest, pki: NetworkPKI, insight: Callable[..., MarketInsight],
        tmp_path: Path) -> None:
    """The same on mosquitto, amqtt and an aedes cluster (which streams retained messages in
    no set order): the restarted node still holds every state, and the joiner's snapshot is
    complete by the parts the signed head names."""
    n = 200
    categories = _categories(pki, n + 1, "bk")
    config = broker_kind.config("acme", outbox=tmp_path / "acme.sqlite",
                                max_message_bytes=SMALL)
    async with PearNetwork(config) as tx:
        await _publish(tx, insight, categories[:n], 1.0)
        assert not tx.status().dropped
    async with PearNetwork(config) as tx:
        await _publish(tx, insight, categories[n:], 250.0)
        assert not tx.status().dropped
    async with PearNetwork(broker_kind.config("initech", receiving=True)) as late:
        result = await late.sync(timeout=60)
        assert not late.status().dropped
    assert result.missing_pages == {}
    _holds(result, {**dict.fromkeys(categories[:n], 1.0), categories[n]: 250.0})


async def test_a_page_that_shrinks_leaves_no_stale_part(
        make_config: Callable[..., NetworkConfig], mosquitto: MosquittoBroker, pki: NetworkPKI,
        insight: Callable[..., MarketInsight], tmp_path: Path) -> None:
    """Fewer parts than before (here: the node restarts with the default limit, so a page
    fits one message again): the parts past the new ones are cleared, and a joiner reads
    only current states."""
    n = 200
    categories = _categories(pki, n, "sh")
    outbox = tmp_path / "acme.sqlite"
    async with PearNetwork(make_config("acme", outbox=outbox,
                                       max_message_bytes=SMALL)) as tx:
        await _publish(tx, insight, categories, 1.0)
    before = await asyncio.to_thread(_parts, mosquitto, pki)
    assert max(part for _page, part in before) >= 5
    async with PearNetwork(make_config("acme", outbox=outbox)) as tx:
        # Half the states replaced on each page: the page goes out whole, in one message.
        await _publish(tx, insight, categories[::2], 300.0)
        assert not tx.status().dropped
    after = await asyncio.to_thread(_parts, mosquitto, pki)
    assert set(after) == {(page, 0) for page in PAGES}
    expected = {c: 300.0 if i % 2 == 0 else 1.0 for i, c in enumerate(categories)}
    result, dropped = await _late_sync(make_config, "globex")
    assert not dropped and not result.missing_pages
    _holds(result, expected)

    # A stale part back on the broker (a crash between the new parts and the clear, or one
    # replayed by another node of the member, which the ACL lets write there): genuine, but
    # older than the page's part 0, so none of its states is taken as current.
    acme = TopicScheme(mode="consortium", network=pki.network, member="acme")
    with probe(mosquitto, pki.node("acme", "store-2")) as replayer:
        for (page, part), m in before.items():
            if part:
                replayer.publish(acme.checkpoint("store-1", page, part), m.payload, retain=True)
    result, dropped = await _late_sync(make_config, "initech")
    assert not dropped and not result.missing_pages
    _holds(result, expected)


async def test_a_part_forged_by_another_node_of_the_member_is_refused(
        make_config: Callable[..., NetworkConfig], mosquitto: MosquittoBroker, pki: NetworkPKI,
        insight: Callable[..., MarketInsight], tmp_path: Path) -> None:
    """The ACL lets every node of a member write its subtree, so store-2 can put a part on
    store-1's topics; signed by store-2, it is refused (identity_mismatch), and store-1's
    states stay its own. A genuine part moved to another part's topic is refused too."""
    n = 120
    categories = _categories(pki, n, "fg")
    after = next(c for c in (f"fg/after{i}" for i in range(100)) if _page_of(pki, c) not in PAGES)
    # (An on-disk outbox: the node keeps a history log, whose signed head names its parts.
    # A head goes out when the log grew, so one more insight after the parts were sent makes
    # sure the last one names them all.)
    async with PearNetwork(make_config("acme", outbox=tmp_path / "acme.sqlite",
                                       max_message_bytes=SMALL)) as tx:
        await _publish(tx, insight, categories, 1.0)
        await tx.broadcast_market_insight(insight(category=after))
        await tx.flush(timeout=30)
    parts = await asyncio.to_thread(_parts, mosquitto, pki)
    page = PAGES[0]
    last = max(part for p, part in parts if p == page)
    assert last >= 2
    forger = EnvelopeCodec.from_config(make_config("acme", node="store-2"))
    genuine = forger.decode(parts[(page, 1)].payload, check_replay=False).message.body
    forged_states = {category: _priced(item, 95_000.0)
                     for category, item in genuine["states"].items()}
    acme = TopicScheme(mode="consortium", network=pki.network, member="acme")
    with probe(mosquitto, pki.node("acme", "store-2")) as evil:
        # Its own part on store-1's topic, with every state of the genuine part at 99.
        evil.publish(acme.checkpoint("store-1", page, 1),
                     forger.encode(kind="checkpoint", body={**genuine, "states": forged_states}),
                     retain=True)
        # store-1's own part 1 moved over its last part (the body names part 1).
        evil.publish(acme.checkpoint("store-1", page, last), parts[(page, 1)].payload,
                     retain=True)
    result, dropped = await _late_sync(make_config, "globex")
    assert dropped.get("identity_mismatch", 0) >= 1
    assert dropped.get("malformed", 0) >= 1
    prices = _prices(result)
    assert not any(95_000.0 in price for price in prices.values())
    # What the two overwritten topics held is missing, and sync() says so.
    assert result.missing_pages
    lost = set(genuine["states"]) | set(forger.decode(
        parts[(page, last)].payload, check_replay=False).message.body["states"])
    assert set(prices) == set(categories) - lost | {after}


def _drain(p: Any, marker: str) -> list[Any]:
    """What ``p`` received since it was last drained (non-empty messages on the checkpoint
    topics), up to a marker published now."""
    p.publish(marker, b"end")
    _end, before = p.expect(marker, timeout=30)
    return [m for m in before if m.payload and m.topic != marker]


def _part_states(codec: EnvelopeCodec, m: Any) -> set[str]:
    return set(codec.decode(m.payload, check_replay=False).message.body["states"])


async def test_parts_stay_put_so_a_bulk_update_costs_one_message_a_part(
        make_config: Callable[..., NetworkConfig], mosquitto: MosquittoBroker, pki: NetworkPKI,
        insight: Callable[..., MarketInsight], tmp_path: Path) -> None:
    """A bulk update streaming into two pages, with an outbox small enough that the rows
    waiting for their page bound it (4 kB a page): each part goes about once, where re-cutting
    and re-sending whole pages whenever 4 kB of rows waited cost hundreds of messages. An
    update of one state then re-sends the one part holding it, also after a restart (the node
    keeps the parts it reads back); late joiners hold every state, complete by the head."""
    n = 300
    categories = _categories(pki, n, "st")
    outbox = tmp_path / "acme.sqlite"
    acme = TopicScheme(mode="consortium", network=pki.network, member="acme")
    marker = TopicScheme(mode="consortium", network=pki.network,
                         member="initech").sync_marker("counter")
    reader = EnvelopeCodec.from_config(make_config("initech", node="probe"))

    def config() -> NetworkConfig:
        return make_config("acme", outbox=outbox, max_message_bytes=SMALL,
                           outbox_max_bytes=4 * 1024 * 1024)

    with probe(mosquitto, pki.node("initech", "probe"),
               subscribe=[acme.node_checkpoint_filter("store-1"), marker]) as counter:
        async with PearNetwork(config()) as tx:
            for category in categories:  # one by one, as a bulk update streams
                await tx.broadcast_market_insight(insight(category=category, price=1.5))
            await tx.flush(timeout=60)
            assert not tx.status().dropped
            bulk = await asyncio.to_thread(_drain, counter, marker)
            held = await asyncio.to_thread(_parts, mosquitto, pki)
            assert max(part for _page, part in held) >= 10
            # About one message a part (a part due mid-stream may go twice); re-cutting and
            # re-sending whole pages sent 661 here.
            assert len(bulk) <= len(held) + len(held) // 4, (len(bulk), len(held))
            assert {(parse_topic(m.topic).page, parse_topic(m.topic).part)
                    for m in bulk} == set(held)

            # One state updated in place: the one part holding it goes again, nothing else.
            one = categories[n // 2]
            await _publish(tx, insight, [one], 1.5)
            (update,) = await asyncio.to_thread(_drain, counter, marker)
            assert one in _part_states(reader, update)
            assert _part_states(reader, update) == _part_states(
                reader, held[(parse_topic(update.topic).page, parse_topic(update.topic).part)])

        # Restarted: the parts read back keep their states, so again one part goes.
        async with PearNetwork(config()) as tx:
            other = categories[n // 3]
            await _publish(tx, insight, [other], 250.0)
            assert not tx.status().dropped
            (update,) = await asyncio.to_thread(_drain, counter, marker)
            assert other in _part_states(reader, update)
            assert (parse_topic(update.topic).page, parse_topic(update.topic).part) in held
    result, dropped = await _late_sync(make_config, "globex")
    assert not dropped and not result.missing_pages
    _holds(result, {**dict.fromkeys(categories, 1.5), other: 250.0})


async def test_a_new_part_is_named_by_a_head_without_more_insights(
        make_config: Callable[..., NetworkConfig], mosquitto: MosquittoBroker, pki: NetworkPKI,
        insight: Callable[..., MarketInsight], tmp_path: Path) -> None:
    """A part added after the last signed head (here: the last states of a burst open a new
    part sent after the head that followed their insights) is named by a head sent for it,
    so a joiner that comes later waits for it: its sync() is complete with every state."""
    n = 150
    categories = _categories(pki, n, "hd")
    async with PearNetwork(make_config("acme", outbox=tmp_path / "acme.sqlite",
                                       max_message_bytes=SMALL)) as tx:
        await _publish(tx, insight, categories, 1.0)
        held = await asyncio.to_thread(_parts, mosquitto, pki)
        head_topic = TopicScheme(mode="consortium", network=pki.network,
                                 member="acme").log_head("store-1")
        heads = await asyncio.to_thread(_retained, mosquitto, pki, head_topic)
        reader = EnvelopeCodec.from_config(make_config("initech", node="probe"))
        named = reader.decode(heads[0].payload, check_replay=False).message.body["pages"]
        assert {int(slot, 16) for slot in named} == {
            part * CHECKPOINT_PAGES + page for page, part in held}
    result, dropped = await _late_sync(make_config, "initech")
    assert not dropped and not result.missing_pages
    _holds(result, dict.fromkeys(categories, 1.0))
