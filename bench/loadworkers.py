"""Worker processes of the latency and fan-in benchmarks (protocol: see :mod:`bench.workers`).

Latency: a publisher paced at a fixed rate against scheduled send times (``t0 + i / rate``,
so a late send never shifts the ones after it) and a subscriber in another process. Both
take ``time.monotonic()``, one clock for every process on the host, so a message's one-way
latency is its arrival time minus the time its publish call started. Raw paho carries that
time in the payload; pear cannot (the privacy filter decides what leaves the node), so its
publisher reports the item id ``broadcast_market_insight`` returned with the time of the
call and the receiver reports when each item id arrived; the parent joins the two.
Publishers and subscribers alike freeze what their setup allocated before the stream starts
(:func:`bench.workers.ready`).

Fan-in: one process drives many ``PearNetwork`` nodes on one asyncio loop, reports when each
finished connecting, then when each lost and regained its connection around a broker restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from .env import NODE, BenchEnv, issue_shard
from .rawclient import RawClient
from .workers import _go_async, _go_serving, make_insights, pear_config, raw_payloads, ready

__all__ = ["LOAD_WORKERS", "lateness", "stamp", "unstamp"]

_LATE_MS = 1.0  # a send starting this much after its scheduled time counts as late


def stamp(payload: bytes, index: int, t_send: float) -> bytes:
    """``payload`` with the message's index and send time written over its head."""
    head = b"%09d %.9f " % (index, t_send)
    return head + payload[len(head):]


def unstamp(payload: bytes | bytearray) -> tuple[int, float]:
    """(index, send time) from a :func:`stamp`-ed payload."""
    index, t_send = payload.split(b" ", 2)[:2]
    return int(index), float(t_send)


def lateness(late: list[float]) -> dict[str, float]:
    """How far behind schedule the sends started (ms): the pacing's own quality."""
    late = sorted(late)
    n = len(late)
    return {"late_p99_ms": 1000 * late[min(n - 1, int(0.99 * n))] if n else 0.0,
            "late_max_ms": 1000 * late[-1] if n else 0.0,
            "late_over_1ms": float(sum(1 for x in late if x * 1000 > _LATE_MS))}


# -- raw paho --------------------------------------------------------------------------------

def lat_raw_pub(conn: Connection, spec: dict[str, Any]) -> dict[str, Any]:
    """Publish ``total`` QoS 1 messages at ``rate``/s, each stamped with its send time."""
    env: BenchEnv = spec["env"]
    total, rate, topic = spec["total"], spec["rate"], spec["topic"]
    payloads = raw_payloads(total, spec["size"])
    client = RawClient(env=env, member=spec["member"], client_id=spec["client_id"],
                       window=total, protocol=spec.get("protocol", 5))
    client.connect()  # sets TCP_NODELAY on the client socket
    c = client.client
    ready(conn)
    _go_serving(conn, client)
    late: list[float] = []
    t0 = time.monotonic() + 0.005
    for i in range(total):
        due = t0 + i / rate
        now = time.monotonic()
        while now < due:
            # Serve PUBACKs while waiting: select() returns at the due time at the latest.
            client.client.loop(timeout=due - now)
            now = time.monotonic()
        late.append(now - due)
        c.publish(topic, stamp(payloads[i], i, time.monotonic()), qos=1)
    deadline = time.monotonic() + 30
    while client.acked < total and time.monotonic() < deadline:
        client.service()
        c.loop(timeout=0.1)
    client.close()
    return {"t_start": t0, "sent": total, "acked": client.acked, **lateness(late)}


def lat_raw_sub(conn: Connection, spec: dict[str, Any]) -> dict[str, Any]:
    """Receive ``total`` stamped messages; the latency of those from ``skip`` on (ms)."""
    env: BenchEnv = spec["env"]
    total, skip = spec["total"], spec["skip"]
    lat: list[float] = []

    def on_payload(payload: bytes | bytearray, now: float) -> None:
        index, t_send = unstamp(payload)
        if index >= skip:
            lat.append(1000 * (now - t_send))

    client = RawClient(env=env, member=spec["member"], client_id=spec["client_id"],
                       protocol=spec.get("protocol", 5), on_payload=on_payload)
    client.connect()
    client.subscribe(spec["topic"], qos=1)
    ready(conn)
    deadline = time.monotonic() + spec["timeout"]
    while client.received < total and time.monotonic() < deadline:
        client.client.loop(timeout=0.5)
    client.close()
    return {"received": client.received, "latency_ms": lat}


# -- pear_mqtt -------------------------------------------------------------------------------

def lat_pear_pub(conn: Connection, spec: dict[str, Any]) -> dict[str, Any]:
    """``broadcast_market_insight`` ``total`` insights at ``rate``/s; report each item id
    with the time its call started (from ``skip`` on)."""
    from pear_mqtt.node.network import PearNetwork

    env: BenchEnv = spec["env"]
    total, rate, skip = spec["total"], spec["rate"], spec["skip"]
    insights = make_insights(total, spec["categories"])

    async def main() -> dict[str, Any]:
        net = PearNetwork(pear_config(env, spec["member"], linger=spec["linger"]))
        await net.connect(timeout=30)
        try:
            ready(conn)
            await _go_async(conn)
            sent: dict[str, float] = {}
            late: list[float] = []
            t0 = time.monotonic() + 0.005
            for i in range(total):
                due = t0 + i / rate
                now = time.monotonic()
                if now < due:
                    await asyncio.sleep(due - now)
                t_call = time.monotonic()
                late.append(t_call - due)
                iid = await net.broadcast_market_insight(insights[i])
                if i >= skip:
                    sent[iid] = t_call
            # Not part of the latency (the receiver has everything by now), so bounded and
            # reported rather than fatal.
            flushed = True
            try:
                await net.flush(timeout=30)
            except TimeoutError:
                flushed = False
            st = net.status()
            return {"t_start": t0, "sent_at": sent, "messages_out": st.messages_out,
                    "flushed": flushed, "outbox_depth": st.outbox_depth, **lateness(late)}
        finally:
            await net.disconnect()

    return asyncio.run(main())


def lat_pear_rx(conn: Connection, spec: dict[str, Any]) -> dict[str, Any]:
    """Receive ``total`` insights; report when each item id reached ``on_insight`` and
    when it came out of ``insights()``."""
    from pear_mqtt.node.network import PearNetwork
    from pear_mqtt.node.records import ReceivedInsight

    env: BenchEnv = spec["env"]
    total = spec["total"]

    async def main() -> dict[str, Any]:
        net = PearNetwork(pear_config(env, spec["member"]))
        await net.connect(timeout=30)
        at_callback: dict[str, float] = {}
        at_iterator: dict[str, float] = {}

        def callback(got: ReceivedInsight) -> None:
            at_callback[got.item_id] = time.monotonic()

        try:
            net.on_insight(callback)
            stream = net.insights()
            ready(conn)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(spec["timeout"]):
                    async for got in stream:
                        at_iterator[got.item_id] = time.monotonic()
                        if len(at_iterator) >= total:
                            break
            return {"received": len(at_iterator), "at_iterator": at_iterator,
                    "at_callback": at_callback, "messages_in": net.status().messages_in}
        finally:
            await net.disconnect()

    return asyncio.run(main())


# -- fan-in ----------------------------------------------------------------------------------

def fanin(conn: Connection, spec: dict[str, Any]) -> dict[str, Any]:
    """Connect ``members`` as one node each, all at once; report; then report each node's
    loss and recovery of its connection while the parent kills and restarts the broker."""
    from pear_mqtt.config.models import (
        EncryptionConfig,
        NetworkConfig,
        PrivacyConfig,
        TLSConfig,
    )
    from pear_mqtt.model.insight import NetworkMode
    from pear_mqtt.node.network import PearNetwork

    env: BenchEnv = spec["env"]
    members: list[str] = spec["members"]
    mode = NetworkMode(spec["mode"])
    t = time.monotonic()
    certs = issue_shard(env, spec["shard"], members)
    issue_s = time.monotonic() - t

    def config(member: str) -> NetworkConfig:
        cert, key = certs[member]
        consortium = mode is NetworkMode.CONSORTIUM
        return NetworkConfig(
            mode=mode, company_id=member, network_id=env.network, node_id=NODE,
            broker_url=f"mqtts://{env.host}:{env.port}",
            tls=TLSConfig(ca_file=env.ca, cert_file=cert, key_file=key),
            privacy=PrivacyConfig(aggregator_key_file=env.aggregator_pub),
            encryption=(EncryptionConfig(keys={"k1": env.group_key}, active="k1")
                        if consortium else EncryptionConfig()))

    async def main() -> dict[str, Any]:
        nets = [PearNetwork(config(m)) for m in members]
        ready(conn, {"issue_s": issue_s})
        await _go_async(conn)
        t_go = time.monotonic()
        connected: list[float] = []
        failed: list[str] = []

        async def join(net: PearNetwork) -> None:
            try:
                await net.connect(timeout=spec["timeout"])
                connected.append(time.monotonic())
            except Exception as exc:  # counted and reported, the others go on
                failed.append(f"{type(exc).__name__}: {exc}")

        await asyncio.gather(*(join(n) for n in nets))
        lost: list[float] = []
        back: list[float] = []

        async def watch(net: PearNetwork) -> None:
            await net.wait_disconnected(timeout=spec["timeout"])
            lost.append(time.monotonic())
            await net.wait_connected(timeout=spec["timeout"])
            back.append(time.monotonic())

        watchers = [asyncio.create_task(watch(n)) for n in nets if n.status().connected]
        await asyncio.sleep(0)  # every watcher is waiting before the parent hears "connected"
        conn.send(("connected", {"t_go": t_go, "connected": connected, "failed": failed}))
        results = await asyncio.gather(*watchers, return_exceptions=True)
        errors = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
        reconnects = sum(n.status().reconnects for n in nets)
        out = {"lost": lost, "back": back, "errors": errors[:5], "not_back": len(errors),
               "reconnects": reconnects}
        # Leaving is not measured: bounded, so that a slow goodbye cannot stall the run.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(
                *(n.disconnect(flush_timeout=0) for n in nets), return_exceptions=True), 20)
        return out

    return asyncio.run(main())


LOAD_WORKERS: dict[str, Callable[[Connection, dict[str, Any]], dict[str, Any]]] = {
    "lat_raw_pub": lat_raw_pub, "lat_raw_sub": lat_raw_sub,
    "lat_pear_pub": lat_pear_pub, "lat_pear_rx": lat_pear_rx, "fanin": fanin,
}
