"""Where a node keeps its retained state (``reliability.state_topics``), against a real
mosquitto over mutual TLS: in its checkpoint pages only (the default) or also one retained
message per category; late joiners, a restarting node and a node that died before its pages
went out all end with every state."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from brokers import MosquittoBroker, NetworkPKI, probe

from pear_mqtt.config.models import NetworkConfig
from pear_mqtt.model.insight import MarketInsight
from pear_mqtt.model.topics import TopicScheme
from pear_mqtt.node.network import PearNetwork


def _retained(mosquitto: MosquittoBroker, pki: NetworkPKI, topic_filter: str) -> list[Any]:
    """Every retained message on ``topic_filter`` now, read by a plain MQTT client (as
    ``mosquitto_sub`` would): the broker sends them before a marker published after the
    SUBSCRIBE comes back."""
    marker = TopicScheme(mode="consortium", network=pki.network,
                         member="initech").sync_marker("probe")
    with probe(mosquitto, pki.node("initech", "probe"), subscribe=[topic_filter, marker]) as p:
        p.publish(marker, b"end")
        _end, before = p.expect(marker)
    return [m for m in before if m.retain]


@pytest.mark.parametrize("state_topics", [False, True], ids=["pages_only", "state_topics"])
async def test_states_reach_late_joiners_with_or_without_per_category_topics(
        make_config: Callable[..., NetworkConfig], mosquitto: MosquittoBroker, pki: NetworkPKI,
        insight: Callable[..., MarketInsight], state_topics: bool) -> None:
    """Pages only: a state is its live insight and its share of a page, nothing on `state/`;
    with ``state_topics`` every category's state is also a retained message there. sync()
    reads the pages either way."""
    n = 200
    async with PearNetwork(make_config("acme", state_topics=state_topics)) as tx:
        for i in range(n):
            await tx.broadcast_market_insight(insight(category=f"sp/c{i:03d}", price=1.0 + i))
        await tx.flush(timeout=30)
        status = tx.status()
    assert status.outbox_depth == 0 and not status.dropped
    if not state_topics:
        # At most n live envelopes (one category each, or several categories together while
        # the loop outruns the sender) and a page per page change at most (each of the n
        # categories changes its page once; on a slow run each change may go out on its own).
        # With state_topics there are also n state messages and ~140 pages.
        assert status.messages_out < 2 * n + 64, status.messages_out
    else:
        assert status.messages_out >= n + 64, status.messages_out
    acme = TopicScheme(mode="consortium", network=pki.network, member="acme")
    states = await asyncio.to_thread(_retained, mosquitto, pki, acme.node_state_filter("store-1"))
    assert len(states) == (n if state_topics else 0)
    pages = await asyncio.to_thread(_retained, mosquitto, pki,
                                    acme.node_checkpoint_filter("store-1"))
    assert pages and all(b'"kind":"checkpoint"' in m.payload for m in pages)
    async with PearNetwork(make_config("globex")) as late:
        result = await late.sync(timeout=30)
        assert late.status().states_from_checkpoints == n
    assert {r.insight.category for r in result} == {f"sp/c{i:03d}" for i in range(n)}


async def test_a_late_joiners_sync_leaves_the_cyclic_collector_running(
        make_config: Callable[..., NetworkConfig], mosquitto: MosquittoBroker, pki: NetworkPKI,
        insight: Callable[..., MarketInsight]) -> None:
    """A page is handled with Python's collector paused; after a sync over real pages and one
    that is not a signed envelope (published by the member's own certificate) it runs again."""
    async with PearNetwork(make_config("acme")) as tx:
        for i in range(40):
            await tx.broadcast_market_insight(insight(category=f"gc/c{i:02d}", price=1.0 + i))
        await tx.flush(timeout=30)
    acme = TopicScheme(mode="consortium", network=pki.network, member="acme")
    with probe(mosquitto, pki.node("acme", "store-1")) as p:
        p.publish(acme.checkpoint("store-1", 255, part=7), b'{"not": "an envelope"}',
                  retain=True)
    assert gc.isenabled()
    async with PearNetwork(make_config("globex")) as late:
        result = await late.sync(timeout=30)
        dropped = late.status().dropped
    assert len(result) == 40
    assert dropped.get("malformed") == 1, dropped  # the bogus page was read and refused
    assert gc.isenabled()


async def test_a_node_that_died_before_its_pages_went_out_sends_them_after_restart(
        make_config: Callable[..., NetworkConfig], mosquitto: MosquittoBroker, pki: NetworkPKI,
        insight: Callable[..., MarketInsight], take: Callable[..., Awaitable[list[Any]]],
        tmp_path: Path) -> None:
    """Its live insights were delivered, its pages never reached the broker (the ACL refused
    them until the node stopped without flushing): the states wait in the on-disk outbox, and
    the restarted node sends the pages with them."""
    outbox = tmp_path / "acme.sqlite"
    acme = TopicScheme(mode="consortium", network=pki.network, member="acme")
    acl = mosquitto.acl_path.read_text(encoding="utf-8")
    pages = acme.node_checkpoint_filter("store-1").replace("+", "#")
    mosquitto.acl_path.write_text(acl + f"\nuser acme\ntopic deny {pages}\n", encoding="utf-8")
    await asyncio.to_thread(mosquitto.reload_and_wait)
    n = 50
    async with PearNetwork(make_config("globex")) as rx:
        stream = rx.insights()
        tx = PearNetwork(make_config("acme", outbox=outbox))
        await tx.connect()
        for i in range(n):
            await tx.broadcast_market_insight(insight(category=f"new/c{i:02d}", price=2.0))
        got = await take(stream, n, timeout=30)
        assert len({g.item_id for g in got}) == n  # every live insight went out
        pending = tx.status().outbox_depth
        await tx.disconnect(flush_timeout=0)  # gone before any page of these states
    assert pending >= n  # one state row per category still waits for its page
    async with PearNetwork(make_config("initech")) as late:
        assert len(await late.sync(timeout=30)) == 0

    mosquitto.acl_path.write_text(acl, encoding="utf-8")
    await asyncio.to_thread(mosquitto.reload_and_wait)
    async with PearNetwork(make_config("acme", outbox=outbox)) as tx:
        await tx.flush(timeout=30)
        assert tx.status().outbox_depth == 0
    async with PearNetwork(make_config("initech", node="store-2")) as late:
        after = await late.sync(timeout=30)
        assert not late.status().dropped
    assert {r.insight.category for r in after} == {f"new/c{i:02d}" for i in range(n)}
    prices = {r.insight.category: r.insight.groups["price_data"]["price"] for r in after}
    assert all(2.0 in price for price in prices.values())


async def test_states_waiting_for_their_pages_stay_within_the_outbox_bound(
        make_config: Callable[..., NetworkConfig], insight: Callable[..., MarketInsight],
        tmp_path: Path) -> None:
    """State rows are never dropped for space, and each waits for a page: a backlog of
    states worth ten times the outbox's bound still goes through (pages go out as their
    waiting rows reach a share of the bound), with nothing refused or dropped."""
    n = 3000  # ~2.4 MB of state rows
    config = make_config("acme", outbox=tmp_path / "acme.sqlite", outbox_max_bytes=256 * 1024)
    async with PearNetwork(config) as tx:
        for i in range(n):
            await tx.broadcast_market_insight(insight(category=f"ob/c{i:04d}", price=1.0))
        await tx.flush(timeout=60)
        status = tx.status()
    assert status.outbox_depth == 0 and not status.dropped
    async with PearNetwork(make_config("globex")) as late:
        assert len(await late.sync(timeout=30)) == n
