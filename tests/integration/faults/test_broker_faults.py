"""Broker crashes: ``kill -9`` of mosquitto (persistence on) in the middle of a stream.

What the scenarios prove: every insight a sender accepted (``broadcast_market_insight``
returned) reaches a receiving node exactly once after de-duplication, across one crash (CI)
or many (soak); redeliveries are counted, both nodes reconnect by themselves, the time from the
broker being back to the first new delivery is measured, and memory stays bounded.

Why it holds: the sender deletes an outbox row only on PUBACK, so whatever the broker had not
acknowledged is sent again after the reconnect; mosquitto forwards a QoS 1 message to the
connected receiver before it acknowledges it, and keeps the receiver's persistent session
(subscriptions, queue) in its persistence file, so nothing published while the receiver is
still reconnecting is dropped for want of a subscriber.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from brokers import MosquittoBroker
from faultkit import Collector, PeakRSS, stream, wait_until
from faults_report import record

from pear_mqtt.config.models import NetworkConfig
from pear_mqtt.node.network import PearNetwork

# Bound on how far this process's resident memory may rise over a scenario (two nodes, a few
# thousand insights; the de-duplication memory and the outbox page are what grows).
MEMORY_BOUND_MB = 120


async def _crash_while_streaming(broker: MosquittoBroker, node: Callable[..., NetworkConfig],
                                 tmp_path: Path, *, n: int, rate: float, kills: int
                                 ) -> dict[str, float | int | None]:
    mem = PeakRSS()
    sent: list[str] = []
    recoveries: list[float] = []
    async with PearNetwork(node("globex", broker.tls_url)) as rx, \
            PearNetwork(node("acme", broker.tls_url, outbox=tmp_path / "acme.sqlite")) as tx:
        got = Collector(rx)
        # mosquitto persists sessions every autosave_interval; a kill before the first save
        # would forget the receiver's subscription (nothing a client can do about that).
        db = broker.persistence_dir / "mosquitto.db"
        await wait_until(db.exists, 10, f"{db} (first autosave)")
        producer = asyncio.create_task(stream(tx, n, rate=rate, sent=sent))
        for k in range(kills):
            # Kill at evenly spaced points of the stream, while insights are in flight.
            at = n * (k + 1) // (kills + 1)
            await wait_until(lambda at=at: len(sent) >= at, 60, f"{at} insights sent")
            await asyncio.to_thread(broker.kill)
            await tx.wait_disconnected(timeout=10)
            await asyncio.to_thread(broker.start)
            back = time.monotonic()
            await got.wait_for(lambda c, back=back: c.first_after(back) is not None, 30,
                               "a delivery after the restart")
            recovery = got.first_after(back)
            assert recovery is not None
            recoveries.append(recovery)
        await asyncio.wait_for(producer, 120)
        await tx.flush(timeout=60)
        await got.wait_ids(set(sent), timeout=60)
        duplicates = got.duplicates
        reconnects = (tx.status().reconnects, rx.status().reconnects)
        dropped = {k: v for k, v in rx.status().dropped.items() if k != "replayed"}
    assert len(sent) == n and len(set(sent)) == n
    assert set(sent) <= got.ids.keys(), f"lost {len(set(sent) - got.ids.keys())}"
    assert len(got) == n  # nothing delivered that was not sent
    assert reconnects[0] >= kills and reconnects[1] >= kills
    assert not dropped, f"the receiver refused legitimate traffic: {dropped}"
    assert mem.growth < MEMORY_BOUND_MB, f"memory rose {mem.growth:.0f} MB"
    return {"sent": n, "delivered": len(got), "duplicated": duplicates,
            "recovery_s": max(recoveries), "peak": mem.peak, "growth": mem.growth}


async def test_broker_kill9_mid_stream_loses_nothing(
        mosquitto_factory: Callable[..., MosquittoBroker],
        node: Callable[..., NetworkConfig], tmp_path: Path) -> None:
    broker = mosquitto_factory(persistence=True, autosave_interval=1)
    r = await _crash_while_streaming(broker, node, tmp_path, n=3000, rate=1000, kills=1)
    record("mosquitto kill -9 mid-stream, restart (persistence on)", group="broker",
           sent=int(r["sent"] or 0), delivered=int(r["delivered"] or 0),
           lost=int(r["sent"] or 0) - int(r["delivered"] or 0),
           duplicated=int(r["duplicated"] or 0), recovery_s=r["recovery_s"],
           peak_rss_mb=r["peak"],
           notes=f"1 kill at 50 %, 1,000 insights/s; memory +{r['growth']:.0f} MB")


@pytest.mark.soak
async def test_broker_kill9_repeatedly_loses_nothing(
        mosquitto_factory: Callable[..., MosquittoBroker],
        node: Callable[..., NetworkConfig], tmp_path: Path) -> None:
    broker = mosquitto_factory(persistence=True, autosave_interval=1)
    r = await _crash_while_streaming(broker, node, tmp_path, n=30_000, rate=1000, kills=10)
    record("mosquitto kill -9 ten times during a 30 s stream", group="broker",
           sent=int(r["sent"] or 0), delivered=int(r["delivered"] or 0),
           lost=int(r["sent"] or 0) - int(r["delivered"] or 0),
           duplicated=int(r["duplicated"] or 0), recovery_s=r["recovery_s"],
           peak_rss_mb=r["peak"], soak=True,
           notes=f"recovery: worst of 10; memory +{r['growth']:.0f} MB")
