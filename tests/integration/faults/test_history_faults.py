"""Verified history under faults: what a broker forgot, a receiver gets back from the log.

The scenario of issue #17: a receiver is away while the sender streams and flushes, and the
broker then dies and comes back without what it had queued for the receiver (a persistence
file older than the receiver's session, or none). Without the history log the receiver never
learns it missed anything; with it, the next entry's index jumps past what it holds, it asks
the sender for the range, and every sent insight arrives (delivered == sent). The second
scenario has the sender gone for good: the network's archive node serves its history.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from brokers import MosquittoBroker
from faultkit import Collector, PeakRSS, stream
from faults_report import record

from pear_mqtt.config.models import NetworkConfig
from pear_mqtt.node.network import PearNetwork

ARCHIVE = "initech/archive"


async def test_a_broker_that_forgets_the_receivers_queue_loses_nothing(
        mosquitto_factory: Callable[..., MosquittoBroker],
        node: Callable[..., NetworkConfig], tmp_path: Path) -> None:
    broker = mosquitto_factory()  # no persistence: a restart forgets every session and queue
    url = broker.tls_url
    mem = PeakRSS()
    sent: list[str] = []
    rx_config = node("globex", url, outbox=tmp_path / "globex.sqlite")
    async with PearNetwork(node("acme", url, outbox=tmp_path / "acme.sqlite")) as tx:
        async with PearNetwork(rx_config) as rx:
            got = Collector(rx)
            await stream(tx, 500, rate=0, sent=sent)
            await got.wait_ids(set(sent), timeout=60)
        # The receiver is away; the broker queues these for its session, then dies with them.
        await stream(tx, 1500, rate=0, start=500, sent=sent)
        await tx.flush(timeout=60)
        await asyncio.to_thread(broker.kill)
        await tx.wait_disconnected(timeout=10)
        await asyncio.to_thread(broker.start)
        await tx.wait_connected(timeout=30)
        back = time.monotonic()
        async with PearNetwork(rx_config) as rx:
            got = Collector(rx)
            # Live traffic after the restart: its log index tells the receiver of the gap.
            await stream(tx, 500, rate=0, start=2000, sent=sent)
            await tx.flush(timeout=60)
            await got.wait_ids(set(sent[500:]), timeout=90)
            recovery = time.monotonic() - back
            status = rx.status()
    missed = len(set(sent[500:]) - got.ids.keys())
    assert missed == 0 and status.log_unrepairable == 0 and status.log_forks == 0
    assert status.log_repaired >= 1  # the forgotten stretch came back by log requests
    record("broker forgets the away receiver's queue (kill -9, no persistence); receiver "
           "back after the sender flushed", group="history", sent=len(sent),
           delivered=len(sent) - missed, lost=missed, duplicated=status.duplicates,
           recovery_s=recovery, peak_rss_mb=mem.peak,
           notes=f"{status.log_gaps} gap(s) seen, {status.log_repaired} envelopes repaired by "
                 "log requests to the sender; 1,500 insights were only in the lost queue")


async def test_the_archive_serves_a_sender_that_is_gone(
        mosquitto: MosquittoBroker, node: Callable[..., NetworkConfig],
        tmp_path: Path) -> None:
    url = mosquitto.tls_url
    mem = PeakRSS()
    sent: list[str] = []
    archive_config = node("initech", url, node="archive", archive_path=tmp_path / "archive")
    async with PearNetwork(archive_config) as archive:
        async with PearNetwork(node("acme", url, outbox=tmp_path / "acme.sqlite",
                                    archive=ARCHIVE)) as tx:
            await stream(tx, 1000, rate=0, sent=sent)
            await tx.flush(timeout=60)
            await archive.wait_logs(lambda: all(
                v.head_length is not None and v.head_length >= v.held
                and v.verified == v.head_length for v in archive.logs()), timeout=60)
        # acme never comes back. A node that was never there joins.
        start = time.monotonic()
        async with PearNetwork(node("globex", url, session_expiry=0,
                                    archive=ARCHIVE)) as late:
            got = Collector(late)
            await got.wait_ids(set(sent), timeout=120)
            took = time.monotonic() - start
            status = late.status()
    missed = len(set(sent) - got.ids.keys())
    assert missed == 0 and status.log_unrepairable == 0 and status.log_forks == 0
    record("sender gone for good; a new receiver gets its history from the archive node",
           group="history", sent=len(sent), delivered=len(sent) - missed, lost=missed,
           duplicated=status.duplicates, recovery_s=took, peak_rss_mb=mem.peak,
           notes=f"{status.log_repaired} envelopes from the archive after the sender left no "
                 "answer for 5 s; recovery = join to last insight")
