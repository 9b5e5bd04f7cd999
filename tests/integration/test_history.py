"""Verified history on a real mosquitto: each node's envelopes form a signed Merkle log;
receivers verify what they hold against its signed head, repair gaps by asking the sender,
and refuse a sender that rewrites its history."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from brokers import MosquittoBroker

from pear_mqtt.config.models import NetworkConfig
from pear_mqtt.model.insight import MarketInsight
from pear_mqtt.node.network import PearNetwork


def _view(net: PearNetwork, member: str) -> Any:
    views = [v for v in net.logs() if v.sender.startswith(f"{member}/")]
    return views[0] if views else None


def _verified(net: PearNetwork, member: str) -> bool:
    """``net`` holds ``member``'s log up to its latest signed head, that head covers every
    entry it holds (a live entry can arrive before the head that covers it), and checked it."""
    v = _view(net, member)
    return (v is not None and v.head_length is not None and v.head_length >= v.held
            and v.verified == v.head_length)


async def test_a_receiver_verifies_the_senders_log_against_its_signed_head(
        make_config: Callable[..., NetworkConfig], tmp_path: Path,
        insight: Callable[..., MarketInsight], take: Callable[..., Awaitable[list[Any]]]) -> None:
    async with PearNetwork(make_config("globex")) as rx:
        stream = rx.insights()
        async with PearNetwork(make_config("acme", outbox=tmp_path / "acme.sqlite")) as tx:
            await tx.broadcast_many([insight(product=f"p{i}") for i in range(40)])
            await take(stream, 40)
            await tx.flush(timeout=10)
        await rx.wait_logs(lambda: _verified(rx, "acme"))
        view = _view(rx, "acme")
        assert view.held == view.verified == view.head_length > 0 and not view.forked
        assert rx.status().log_forks == 0
    assert (tmp_path / "acme.sqlite.history" / "entries.bin").is_file()


async def test_a_late_joiner_gets_the_whole_history_from_the_sender(
        make_config: Callable[..., NetworkConfig], tmp_path: Path,
        insight: Callable[..., MarketInsight], take: Callable[..., Awaitable[list[Any]]]) -> None:
    sent: list[str] = []
    async with PearNetwork(make_config("acme", outbox=tmp_path / "acme.sqlite")) as tx:
        for k in range(3):  # three separate bursts: several envelopes and heads
            sent += await tx.broadcast_many([insight(product=f"p{k}-{i}") for i in range(25)])
            await tx.flush(timeout=10)
        # A node that was never there: no session, only the retained head tells it what
        # it lacks; it asks acme for the range and verifies it.
        async with PearNetwork(make_config("globex", session_expiry=0)) as late:
            stream = late.insights()
            got = await take(stream, len(sent), timeout=30)
            await late.wait_logs(lambda: _verified(late, "acme"))
            status = late.status()
    assert {g.item_id for g in got} == set(sent)
    assert status.log_gaps >= 1 and status.log_repaired >= len(sent) // 25
    assert tx.status().log_forks == 0


async def test_entries_missed_across_a_broker_restart_are_repaired(
        mosquitto_factory: Callable[..., MosquittoBroker],
        make_config: Callable[..., NetworkConfig], tmp_path: Path,
        insight: Callable[..., MarketInsight], take: Callable[..., Awaitable[list[Any]]]) -> None:
    broker = mosquitto_factory()  # no persistence: sessions and queues die with it
    url = broker.tls_url
    async with PearNetwork(make_config("globex", broker_url=url)) as rx, \
            PearNetwork(make_config("acme", broker_url=url,
                                    outbox=tmp_path / "acme.sqlite")) as tx:
        stream = rx.insights()
        first = await tx.broadcast_many([insight(product=f"a{i}") for i in range(30)])
        await take(stream, 30)
        await asyncio.to_thread(broker.kill)
        # Sent while the broker is down: the outbox keeps them, and the sender may deliver
        # them before the receiver has resubscribed, which then misses them.
        later = await tx.broadcast_many([insight(product=f"b{i}") for i in range(60)])
        await asyncio.to_thread(broker.start)
        await tx.flush(timeout=30)
        got = await take(stream, 60, timeout=30)
        await rx.wait_logs(lambda: _verified(rx, "acme"))
    assert {g.item_id for g in got} == set(later)
    assert len(set(first) | set(later)) == 90


async def test_a_sender_that_rewrites_its_history_is_caught_and_refused(
        make_config: Callable[..., NetworkConfig], tmp_path: Path,
        insight: Callable[..., MarketInsight], take: Callable[..., Awaitable[list[Any]]]) -> None:
    outbox = tmp_path / "acme.sqlite"
    async with PearNetwork(make_config("globex")) as rx:
        stream = rx.insights()
        async with PearNetwork(make_config("acme", outbox=outbox)) as tx:
            await tx.broadcast_many([insight(product=f"p{i}") for i in range(10)])
            await take(stream, 10)
            await tx.flush(timeout=10)
        await rx.wait_logs(lambda: (v := _view(rx, "acme")) is not None and v.verified > 0)
        # acme throws its history away but keeps the log's id: what it sends next claims
        # the same places in the same log with other content.
        history = Path(f"{outbox}.history")
        for name in ("entries.bin", "hashes.bin"):
            (history / name).unlink()
        async with PearNetwork(make_config("acme", outbox=outbox)) as tx:
            await tx.broadcast_many([insight(product=f"q{i}") for i in range(10)])
            await tx.flush(timeout=10)
            await rx.wait_logs(lambda: rx.status().log_forks == 1)
            await tx.broadcast_market_insight(insight(product="after"))
            await tx.flush(timeout=10)
            await rx.wait_logs(lambda: rx.status().dropped.get("forked_sender", 0) >= 1)
        (fork,) = rx.forks
        assert fork.sender.startswith("acme/") and fork.first and fork.second
        assert fork.first != fork.second
        assert _view(rx, "acme").forked


async def test_a_request_for_entries_lost_to_retention_gets_a_clear_answer(
        make_config: Callable[..., NetworkConfig], tmp_path: Path,
        insight: Callable[..., MarketInsight], take: Callable[..., Awaitable[list[Any]]]) -> None:
    async with PearNetwork(make_config("acme", outbox=tmp_path / "acme.sqlite",
                                       history_max_bytes=6000, batch_max_items=5)) as tx:
        for k in range(6):
            await tx.broadcast_many([insight(product=f"p{k}-{i}") for i in range(10)])
            await tx.flush(timeout=10)
        async with PearNetwork(make_config("globex", session_expiry=0)) as late:
            await late.wait_logs(lambda: late.status().log_unrepairable > 0)
            status = late.status()
    assert status.log_unrepairable > 0 and status.log_forks == 0


async def test_sync_is_complete_by_the_pages_each_senders_head_names(
        make_config: Callable[..., NetworkConfig], tmp_path: Path,
        insight: Callable[..., MarketInsight]) -> None:
    categories = [f"grocery/c{i}" for i in range(60)]
    async with PearNetwork(make_config("acme", outbox=tmp_path / "acme.sqlite")) as tx:
        await tx.broadcast_many([insight(category=c) for c in categories])
        await tx.flush(timeout=10)
        async with PearNetwork(make_config("globex", session_expiry=0)) as late:
            result = await late.sync(timeout=30)
            view = _view(late, "acme")
    assert {s.insight.category for s in result} == set(categories)
    # the head it waited on named acme's pages, and the log behind them is acme's
    assert view is not None and view.head_length is not None and not view.forked


async def test_a_late_joiner_verifies_a_log_whose_prefix_is_gone_everywhere(
        make_config: Callable[..., NetworkConfig], tmp_path: Path,
        insight: Callable[..., MarketInsight], take: Callable[..., Awaitable[list[Any]]]) -> None:
    sent: list[list[str]] = []
    async with PearNetwork(make_config("acme", outbox=tmp_path / "acme.sqlite",
                                       history_max_bytes=40_000, batch_max_items=5)) as tx:
        for k in range(6):
            sent.append(await tx.broadcast_many([insight(product=f"p{k}-{i}")
                                                 for i in range(10)]))
            await tx.flush(timeout=10)
        # acme is the only holder of its log (no archive), and its retention dropped the
        # oldest entries: a node that was never there verifies from the first one held.
        async with PearNetwork(make_config("globex", session_expiry=0)) as late:
            stream = late.insights()
            await late.wait_logs(lambda: _verified(late, "acme"), timeout=30)
            view = _view(late, "acme")
            status = late.status()
            # The last burst is certainly held (retention keeps the newest entries).
            got = await take(stream, len(sent[-1]), timeout=30)
    assert view.lost is not None and view.lost[0] == 0 < view.lost[1] < view.head_length
    assert view.verified == view.head_length == view.held and not view.forked
    assert status.log_unrepairable == view.lost[1] - view.lost[0]
    assert status.log_forks == 0 and not status.log_refused
    everything = {i for burst in sent for i in burst}
    assert {g.item_id for g in got} <= everything and len(got) == len(sent[-1])
