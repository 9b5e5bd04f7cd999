"""PearNetwork.broadcast_many: a batch of insights in one outbox transaction, end to end."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from brokers import free_port

from pear_mqtt.config.models import NetworkConfig
from pear_mqtt.errors import ConfigError
from pear_mqtt.model.insight import MarketInsight
from pear_mqtt.model.topics import TopicScheme
from pear_mqtt.node.network import PearNetwork
from pear_mqtt.node.producer import Preparer
from pear_mqtt.node.sync import SyncPearNetwork


async def test_a_batch_is_delivered_whole_with_the_ids_single_broadcasts_give(
        make_config: Callable[..., NetworkConfig], tmp_path: Path,
        insight: Callable[..., MarketInsight], take: Callable[..., Awaitable[list[Any]]]) -> None:
    batch = [insight(price=1.0 + i, product=f"sku-{i}", category=f"grocery/c{i % 7}")
             for i in range(400)]
    async with PearNetwork(make_config("globex")) as rx:
        stream = rx.insights()
        async with PearNetwork(make_config("acme", outbox=tmp_path / "outbox.sqlite")) as tx:
            assert await tx.broadcast_many([]) == []
            ids = await tx.broadcast_many(batch)
            got = await take(stream, len(batch), timeout=30)
            await tx.flush(timeout=10)
            assert tx.status().outbox_depth == 0
            # Far fewer envelopes than insights: the batch is signed in large envelopes.
            assert tx.status().messages_out < len(batch) // 4
            # The same observation broadcast alone has the same id (it is a duplicate).
            assert await tx.broadcast_market_insight(batch[17]) == ids[17]
    assert len(set(ids)) == len(batch)
    assert {g.item_id for g in got} == set(ids)
    states = {s.insight.category for s in (await _sync(make_config("initech")))}
    assert states == {f"grocery/c{i}" for i in range(7)}


async def test_states_of_many_categories_share_envelopes(
        make_config: Callable[..., NetworkConfig],
        insight: Callable[..., MarketInsight], take: Callable[..., Awaitable[list[Any]]]) -> None:
    """A producer's loop over a state per category (a chain's nightly price state): the
    few insights of each category go together in envelopes of several categories, and each
    arrives as if on its own category's topic."""
    n = 600
    states = [insight(price=1.0 + i, category=f"sku/p{i:04d}") for i in range(n)]
    async with PearNetwork(make_config("globex")) as rx:
        stream = rx.insights()
        before = rx.status().messages_in
        async with PearNetwork(make_config("acme")) as tx:
            for state in states:
                await tx.broadcast_market_insight(state)
            got = await take(stream, n, timeout=30)
            await tx.flush(timeout=10)
        envelopes = rx.status().messages_in - before
    scheme = TopicScheme(mode="consortium", network="testnet", member="acme")
    assert {(g.insight.category, g.topic) for g in got} == {
        (s.category, scheme.insights(s.category)) for s in states}
    assert envelopes < n // 4, envelopes


async def _sync(config: NetworkConfig) -> list[Any]:
    async with PearNetwork(config) as late:
        result = await late.sync()
    return list(result.states.values())


async def test_a_batch_stored_offline_survives_a_restart(
        make_config: Callable[..., NetworkConfig], tmp_path: Path,
        insight: Callable[..., MarketInsight], take: Callable[..., Awaitable[list[Any]]]) -> None:
    outbox = tmp_path / "outbox.sqlite"
    batch = [insight(price=2.0 + i, product=f"sku-{i}") for i in range(250)]
    async with PearNetwork(make_config("globex")) as rx:
        stream = rx.insights()
        offline = PearNetwork(make_config("acme", broker_url=f"mqtts://127.0.0.1:{free_port()}",
                                          outbox=outbox))
        await offline.connect(wait=False)
        ids = await offline.broadcast_many(batch)
        # On disk when the call returns: the batch and its category's retained state, the
        # newest of the batch (the others it replaced are never stored).
        assert offline.status().outbox_depth == len(batch) + 1
        await offline.disconnect()
        async with PearNetwork(make_config("acme", outbox=outbox)) as online:
            got = await take(stream, len(batch), timeout=30)
            await online.flush(timeout=10)
    assert {g.item_id for g in got} == set(ids)
    [state] = await _sync(make_config("initech"))
    assert state.item_id == ids[-1]


def test_the_blocking_facade_takes_a_batch(make_config: Callable[..., NetworkConfig],
                                           insight: Callable[..., MarketInsight]) -> None:
    with SyncPearNetwork(make_config("acme")) as net:
        ids = net.broadcast_many([insight(product=f"sku-{i}") for i in range(20)])
        net.flush(timeout=10)
        assert len(set(ids)) == 20 and net.status().outbox_depth == 0


async def test_a_batch_prepared_elsewhere_is_sent_only_by_its_own_node(
        make_config: Callable[..., NetworkConfig], tmp_path: Path,
        insight: Callable[..., MarketInsight], take: Callable[..., Awaitable[list[Any]]]) -> None:
    """What the agent's worker processes do: a Preparer built from the node's config alone
    prepares a batch the connected node stores and sends; a batch prepared as another node
    is refused before anything is stored."""
    batch = [insight(price=2.0 + i, product=f"sku-{i}") for i in range(50)]
    mine = Preparer.from_config(make_config("acme")).prepare_many(batch)
    theirs = Preparer.from_config(make_config("initech")).prepare_many(batch)
    async with PearNetwork(make_config("globex")) as rx:
        stream = rx.insights()
        async with PearNetwork(make_config("acme", outbox=tmp_path / "outbox.sqlite")) as tx:
            with pytest.raises(ConfigError, match="prepared as testnet/initech/"):
                await tx.broadcast_prepared(theirs)
            assert tx.status().outbox_depth == 0
            assert await tx.broadcast_prepared(mine) == mine.ids
            got = await take(stream, len(batch), timeout=30)
            # The same ids the node gives them itself.
            assert await tx.broadcast_many(batch) == mine.ids
    assert {g.item_id for g in got} == set(mine.ids)
    assert {g.member for g in got} == {"acme"}
