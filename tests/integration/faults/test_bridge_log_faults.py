"""The bridge's history log under a fault: a public receiver away while the bridge publishes,
with nothing queued for it (its session gone), gets back every aggregate it missed.

Without the log it would hold only the retained aggregate of each category (the latest
window) and never learn of the windows published while it was away. With it, the bridge's
signed head says how long the log is, the receiver asks the bridge for what lies between,
verifies it against that head, and delivers the older windows too (delivered == sent).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta

from bridgekit import WAIT, Clock, Input, Net, close_window, insight, publish, wait, yesterday
from faultkit import PeakRSS
from faults_report import record

from pear_mqtt.bridge.service import Bridge
from pear_mqtt.model.insight import NetworkMode
from pear_mqtt.node.network import PearNetwork
from pear_mqtt.node.records import ReceivedAggregate

CATEGORIES = 3
COMPANIES = 5


def _inputs(days_ago: int) -> list[Input]:
    start = yesterday() - timedelta(days=days_ago)
    return [Input(company=f"c{n}", store="store-1",
                  insight=insight(f"away/cat{c}", start=start, units=10.0 + n + c))
            for c in range(CATEGORIES) for n in range(COMPANIES)]


class _Aggregates:
    """Distinct (topic, window) aggregates a node delivered, over its connections."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, float]] = set()
        self._changed = asyncio.Event()

    async def connect(self, node: PearNetwork) -> asyncio.Task[None]:
        """Connect ``node`` and collect what it delivers, the retained aggregates too."""
        await node.connect(wait=False)
        stream = node.aggregates()  # (registered before the connection exists)
        task = asyncio.create_task(self._collect(stream))
        await node.wait_connected(timeout=WAIT)
        return task

    async def _collect(self, stream: AsyncIterator[ReceivedAggregate]) -> None:
        async for got in stream:  # ends when the node disconnects
            self.seen.add((got.topic, got.aggregate.window_start.timestamp()))
            self._changed.set()

    async def wait_count(self, n: int) -> None:
        try:
            async with asyncio.timeout(WAIT):
                while len(self.seen) < n:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"{len(self.seen)} of {n} aggregates delivered") from None


async def test_a_public_receiver_away_while_the_bridge_publishes_gets_every_window(
        net: Net) -> None:
    mem = PeakRSS()
    clock = Clock()
    config = net.node_config(net.member("reader"), mode=NetworkMode.PUBLIC)
    # No session kept while it is away: the broker queues nothing for it.
    config = config.model_copy(update={"reliability": config.reliability.model_copy(
        update={"session_expiry": 0})})
    got = _Aggregates()
    rx = PearNetwork(config)
    async with Bridge(net.bridge_config(settle_seconds=60), clock=clock) as bridge:
        task = await got.connect(rx)
        first = _inputs(2)
        await publish(net, first)
        await wait(bridge, lambda s: s.items_counted >= len(first))
        await close_window(bridge, clock)
        await got.wait_count(CATEGORIES)
        await rx.disconnect()
        await task
        # Two more windows while it is away: on its return the retained aggregates are
        # the latest window's only; the one before exists in the bridge's log alone.
        later = _inputs(1) + _inputs(0)
        await publish(net, later)
        await wait(bridge, lambda s: s.items_counted >= len(first) + len(later))
        status = await close_window(bridge, clock, windows=2)
        length = status.log_length
        back = time.monotonic()
        task = await got.connect(rx)
        await got.wait_count(3 * CATEGORIES)
        recovery = time.monotonic() - back
        await rx.wait_logs(lambda: any(v.verified == length for v in rx.logs()),
                           timeout=WAIT)
        rx_status = rx.status()
        await rx.disconnect()
        await task
    sent = 3 * CATEGORIES
    missed = sent - len(got.seen)
    assert length == 2 * sent and missed == 0
    assert rx_status.log_repaired >= 2 * CATEGORIES and rx_status.log_forks == 0
    record("public receiver away (no session) while the bridge publishes two windows; "
           "back, it repairs the bridge's log", group="history", sent=sent,
           delivered=len(got.seen), lost=missed, recovery_s=recovery, peak_rss_mb=mem.peak,
           notes=f"aggregates; {rx_status.log_repaired} entries (aggregates and receipts) "
                 f"repaired by log requests to the bridge, all {length} verified against "
                 "its signed head")
