"""A hostile network between nodes and broker: a TCP proxy that resets, delays, stalls
half-open and partitions the connections while a node streams insights.

Both nodes (sender acme, receiver globex) reach the broker through one
:class:`faultproxy.FaultProxy`, so every fault hits both directions of the traffic. What the
scenarios prove, for each fault: zero accepted insights lost after de-duplication, duplicates
counted, the nodes find their way back by themselves (keepalive for a silent link, backoff
with jitter for refused connects), recovery time measured, memory bounded, no hang (every wait
has a deadline).

Why it holds: the sender keeps every insight in its outbox until the broker's PUBACK, and
sends again what was in flight on a connection that died; the broker keeps the receiver's
persistent session and queues for it while it is away; receivers drop redeliveries by item
id (and by the envelope replay window).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from brokers import MosquittoBroker
from faultkit import Collector, PeakRSS, stream, wait_until
from faultproxy import FaultProxy
from faults_report import record

from pear_mqtt.config.models import NetworkConfig
from pear_mqtt.node.network import PearNetwork

MEMORY_BOUND_MB = 120


@dataclass
class Pair:
    rx: PearNetwork
    tx: PearNetwork
    got: Collector
    proxy: FaultProxy
    sent: list[str]
    mem: PeakRSS


@contextlib.asynccontextmanager
async def pair_behind(proxy: FaultProxy, node: Callable[..., NetworkConfig], tmp_path: Path,
                      **reliability: Any) -> AsyncIterator[Pair]:
    mem = PeakRSS()
    async with PearNetwork(node("globex", proxy.url, **reliability)) as rx, \
            PearNetwork(node("acme", proxy.url, outbox=tmp_path / "acme.sqlite",
                             **reliability)) as tx:
        yield Pair(rx=rx, tx=tx, got=Collector(rx), proxy=proxy, sent=[], mem=mem)


async def finish(p: Pair, n: int, producer: asyncio.Task[list[str]]) -> dict[str, Any]:
    """Wait for the stream to end and every accepted insight to arrive; check the counts."""
    await asyncio.wait_for(producer, 120)
    await p.tx.flush(timeout=60)
    await p.got.wait_ids(set(p.sent), timeout=60)
    dropped = {k: v for k, v in p.rx.status().dropped.items() if k != "replayed"}
    assert len(p.sent) == n and len(set(p.sent)) == n
    assert set(p.sent) <= p.got.ids.keys(), f"lost {len(set(p.sent) - p.got.ids.keys())}"
    assert len(p.got) == n
    assert not dropped, f"the receiver refused legitimate traffic: {dropped}"
    assert p.mem.growth < MEMORY_BOUND_MB, f"memory rose {p.mem.growth:.0f} MB"
    return {"sent": n, "delivered": len(p.got), "lost": n - len(p.got),
            "duplicated": p.got.duplicates, "peak_rss_mb": p.mem.peak}


def mem_note(p: Pair) -> str:
    # The peak is the whole pytest process's; what the scenario added is the growth.
    return f"; memory +{p.mem.growth:.0f} MB over the scenario"


async def sent_at_least(p: Pair, k: int) -> None:
    await wait_until(lambda: len(p.sent) >= k, 60, f"{k} insights sent")


async def delivered_after(p: Pair, t: float, timeout: float = 30) -> float:
    """Seconds from monotonic ``t`` to the first delivery after it."""
    await p.got.wait_for(lambda c: c.first_after(t) is not None, timeout,
                         "a delivery after the fault cleared")
    rec = p.got.first_after(t)
    assert rec is not None
    return rec


async def test_connections_reset_mid_stream(
        mosquitto: MosquittoBroker, proxy_factory: Callable[[MosquittoBroker], FaultProxy],
        node: Callable[..., NetworkConfig], tmp_path: Path) -> None:
    n, resets = 3000, 3
    proxy = proxy_factory(mosquitto)
    async with pair_behind(proxy, node, tmp_path) as p:
        producer = asyncio.create_task(stream(p.tx, n, rate=1000, sent=p.sent))
        recoveries = []
        for k in range(resets):
            await sent_at_least(p, n * (k + 1) // (resets + 1))
            # Both nodes back through the proxy and connected at the MQTT level (a delivery
            # after the last reset can come from the broker's queue while the sender is still
            # reconnecting; a link reset during its handshake is not a lost connection).
            await wait_until(lambda k=k: proxy.open_links == 2 and all(
                (st := peer.status()).connected and st.reconnects >= k
                for peer in (p.tx, p.rx)), 30, "both nodes reconnected")
            assert await asyncio.to_thread(proxy.drop) >= 2  # both nodes' connections
            cleared = time.monotonic()
            # (No wait for the disconnect: the node may be back before such a wait starts;
            # the reconnect counters are checked at the end.)
            recoveries.append(await delivered_after(p, cleared))
        r = await finish(p, n, producer)
        assert p.tx.status().reconnects >= resets and p.rx.status().reconnects >= resets
    record("proxy resets (RST) every connection, 3 times mid-stream", group="network",
           recovery_s=max(recoveries),
           notes=f"{proxy.stats.reset} connections reset" + mem_note(p), **r)


async def test_added_latency(
        mosquitto: MosquittoBroker, proxy_factory: Callable[[MosquittoBroker], FaultProxy],
        node: Callable[..., NetworkConfig], tmp_path: Path) -> None:
    n, delay = 2000, 0.25
    proxy = proxy_factory(mosquitto)
    async with pair_behind(proxy, node, tmp_path) as p:
        producer = asyncio.create_task(stream(p.tx, n, rate=1000, sent=p.sent))
        await sent_at_least(p, n // 4)
        await asyncio.to_thread(proxy.delay, delay)
        await sent_at_least(p, 3 * n // 4)
        # The smoothed PUBACK round trip follows the delay once delayed acks are back; a
        # producer that fell behind schedule can reach 3/4 before the first of them does.
        floor = 2 * delay * 1000 * 0.8
        with contextlib.suppress(AssertionError):
            await wait_until(lambda: (p.tx.status().latency_ms or 0) >= floor, 10,
                             "the PUBACK round trip to show the delay")
        latency = p.tx.status().latency_ms
        await asyncio.to_thread(proxy.heal)
        cleared = time.monotonic()
        recovery = await delivered_after(p, cleared)
        r = await finish(p, n, producer)
        assert p.tx.status().reconnects == 0, "a slow link must not cost the connection"
    assert latency is not None and latency >= floor, latency
    record(f"proxy adds {delay * 1000:.0f} ms each way for half the stream", group="network",
           recovery_s=recovery, notes=f"no reconnect; PUBACK round trip ~{latency:.0f} ms "
           "while delayed" + mem_note(p), **r)


async def test_half_open_stall_is_detected_by_keepalive(
        mosquitto: MosquittoBroker, proxy_factory: Callable[[MosquittoBroker], FaultProxy],
        node: Callable[..., NetworkConfig], tmp_path: Path) -> None:
    n = 3000
    proxy = proxy_factory(mosquitto)
    # keepalive 5 s (the minimum): paho pings after 5 s of silence and gives up 5 s later.
    async with pair_behind(proxy, node, tmp_path, keepalive=5) as p:
        producer = asyncio.create_task(stream(p.tx, n, rate=200, sent=p.sent))
        await sent_at_least(p, n // 5)
        await asyncio.to_thread(proxy.stall)  # open links go silent; new ones still forward
        stalled = time.monotonic()
        # Both waits start now: one node may notice, and be back, before the other notices.
        await asyncio.gather(p.tx.wait_disconnected(timeout=20),
                             p.rx.wait_disconnected(timeout=20))
        detected = time.monotonic() - stalled
        recovery = await delivered_after(p, stalled)
        r = await finish(p, n, producer)
        await asyncio.to_thread(proxy.heal)
    assert detected <= 3 * 5 + 2, f"a silent link took {detected:.1f} s to notice"
    record("half-open stall (both directions silent, nothing closed)", group="network",
           recovery_s=recovery, notes=f"keepalive 5 s: noticed after {detected:.1f} s; "
           "recovery counted from the stall" + mem_note(p), **r)


@pytest.mark.parametrize("how", ["refuse", "blackhole"])
async def test_partition_then_heal(
        how: str, mosquitto: MosquittoBroker,
        proxy_factory: Callable[[MosquittoBroker], FaultProxy],
        node: Callable[..., NetworkConfig], tmp_path: Path) -> None:
    # A blackholed connect fails only when paho's 5 s handshake timeout fires: the outage
    # must outlast it for the node to have an error to report.
    n, outage = 2000, 4.0 if how == "refuse" else 7.0
    proxy = proxy_factory(mosquitto)
    async with pair_behind(proxy, node, tmp_path) as p:
        producer = asyncio.create_task(stream(p.tx, n, rate=400, sent=p.sent))
        await sent_at_least(p, n // 4)
        # The partition stalls the open links and refuses or swallows new ones; resetting the
        # open links stands in for both ends' keepalive expiring (the stall test covers it).
        await asyncio.to_thread(proxy.partition, how)  # type: ignore[arg-type]
        await asyncio.to_thread(proxy.drop)
        await p.tx.wait_disconnected(timeout=5)
        began = time.monotonic()
        await wait_until(lambda: time.monotonic() - began >= outage, outage + 1,
                         "the partition's duration")
        offline_depth = p.tx.status().outbox_depth
        assert p.tx.status().last_error, "a failing reconnect must say why"
        await asyncio.to_thread(proxy.heal)
        healed = time.monotonic()
        await p.tx.wait_connected(timeout=20)
        await p.rx.wait_connected(timeout=20)
        reconnected = time.monotonic() - healed
        recovery = await delivered_after(p, healed)
        r = await finish(p, n, producer)
    attempts = proxy.stats.refused if how == "refuse" else proxy.stats.blackholed
    assert attempts >= 1, "the nodes must have tried to reconnect during the partition"
    assert offline_depth > 0  # the sender kept broadcasting into its outbox meanwhile
    record(f"partition {outage:.0f} s ({how} new connections), then heal", group="network",
           recovery_s=recovery,
           notes=f"{attempts} connects {how}d; {offline_depth} rows queued offline; "
           f"reconnected {reconnected:.2f} s after heal" + mem_note(p), **r)


@pytest.mark.soak
async def test_flapping_network_for_two_minutes(
        mosquitto: MosquittoBroker, proxy_factory: Callable[[MosquittoBroker], FaultProxy],
        node: Callable[..., NetworkConfig], tmp_path: Path) -> None:
    """Random faults every few seconds while 60,000 insights stream (500/s for 120 s)."""
    n = 60_000
    proxy = proxy_factory(mosquitto)
    rng = random.Random(7)
    faults: dict[str, int] = {}
    async with pair_behind(proxy, node, tmp_path, keepalive=5) as p:
        producer = asyncio.create_task(stream(p.tx, n, rate=500, sent=p.sent))
        worst = 0.0
        while not producer.done() and len(p.sent) < n * 0.9:
            fault = rng.choice(["drop", "delay", "stall", "refuse", "blackhole"])
            faults[fault] = faults.get(fault, 0) + 1
            if fault == "drop":
                await asyncio.to_thread(proxy.drop)
            elif fault == "delay":
                await asyncio.to_thread(proxy.delay, rng.uniform(0.05, 0.5))
            elif fault == "stall":
                await asyncio.to_thread(proxy.stall)
            else:
                await asyncio.to_thread(proxy.partition, fault)  # type: ignore[arg-type]
                await asyncio.to_thread(proxy.drop)
            hold = rng.uniform(0.5, 4.0)
            began = time.monotonic()
            await wait_until(lambda b=began, h=hold: time.monotonic() - b >= h, hold + 1,
                             "the fault's duration")
            await asyncio.to_thread(proxy.heal)
            healed = time.monotonic()
            # A stall shorter than the keepalive just resumes; otherwise the nodes reconnect.
            worst = max(worst, await delivered_after(p, healed, timeout=40))
        r = await finish(p, n, producer)
    record("flapping network: random reset/delay/stall/partition for 2 min", group="network",
           recovery_s=worst, soak=True,
           notes="faults: " + ", ".join(f"{k} {v}" for k, v in sorted(faults.items()))
           + "; recovery: worst" + mem_note(p), **r)
