"""Process entry points: each benchmark client runs alone in a spawned process.

Protocol over a :func:`multiprocessing.Pipe`: the worker connects (and subscribes), sends
``("ready", info)``, waits for ``"go"`` when it is a sender (receivers start receiving at
once), does the timed work and sends ``("done", result)``; ``("error", traceback)`` on
failure. Times are ``time.monotonic()`` (CLOCK_MONOTONIC, one clock for every process on the
machine), so the parent can subtract a publisher's start from a subscriber's last arrival.

With ``spec["profile"]`` set to a path, the timed part runs under :mod:`cProfile` and the
statistics are dumped there.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import gc
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .env import NODE, BenchEnv
from .rawclient import RawClient

__all__ = ["WORKERS", "entry", "make_insights", "pear_config", "raw_payloads", "ready"]


def raw_payloads(n: int, size: int) -> list[bytes]:
    """``n`` distinct printable payloads of ``size`` bytes (no newline: mosquitto_pub -l)."""
    alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    base = (alphabet * (size // len(alphabet) + 2))
    out = []
    for i in range(n):
        head = f"{i:09d}".encode()
        off = i % len(alphabet)
        out.append((head + base[off:off + size])[:size])
    return out


@contextlib.contextmanager
def _profiled(path: str | None) -> Iterator[None]:
    if not path:
        yield
        return
    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        prof.dump_stats(path)


def ready(conn: Connection, info: dict[str, Any] | None = None) -> None:
    """Tell the parent this worker is set up. What setup allocated is frozen first
    (``gc.freeze()``), as a long-running application does: one full collection over it
    (15-40 ms with pear's stack loaded, measured) would otherwise land inside the timed part
    of some runs and not of others."""
    gc.freeze()
    conn.send(("ready", info if info is not None else {}))


def _go(conn: Connection, expected: str = "go") -> None:
    msg = conn.recv()
    if msg != expected:
        raise RuntimeError(f"expected {expected!r}, got {msg!r}")


def _go_serving(conn: Connection, client: RawClient) -> None:
    """Wait for "go" while serving the paho socket (keep-alive pings, stray packets)."""
    from multiprocessing.connection import wait

    sock = client.client.socket()
    watched: list[Any] = [conn] if sock is None else [conn, sock]
    while True:
        ready = wait(watched, timeout=5.0)
        if conn in ready:
            _go(conn)
            return
        client.service()


async def _go_async(conn: Connection) -> None:
    # Wait on the pipe without blocking the event loop (paho keep-alives, incoming presence).
    await asyncio.get_running_loop().run_in_executor(None, _go, conn)


# -- raw paho -----------------------------------------------------------------------------

def raw_pub(conn: Connection, spec: dict[str, Any]) -> dict[str, Any]:
    """Publish ``n`` payloads of ``size`` bytes at QoS 1 (optionally retained, one topic each
    when ``distinct_topics``); time from the first publish to the last PUBACK."""
    env: BenchEnv = spec["env"]
    n, size = spec["n"], spec["size"]
    payloads = raw_payloads(n, size)
    topic = spec["topic"]
    topics = [f"{topic}/c{i:06d}" for i in range(n)] if spec.get("distinct_topics") else [topic]
    client = RawClient(env=env, member=spec["member"], client_id=spec["client_id"],
                       window=spec["window"], mode=spec["pub_window"],
                       protocol=spec.get("protocol", 5))
    client.connect()
    ready(conn)
    _go_serving(conn, client)
    with _profiled(spec.get("profile")):
        t0 = time.monotonic()
        client.publish_all(topics, payloads, retain=spec.get("retain", False))
        t1 = time.monotonic()
    client.close()
    return {"t_start": t0, "t_acked": t1, "acked": client.acked}


def raw_sub(conn: Connection, spec: dict[str, Any]) -> dict[str, Any]:
    """Subscribe to ``topic`` and receive ``n`` messages (the first arrives after "ready")."""
    env: BenchEnv = spec["env"]
    client = RawClient(env=env, member=spec["member"], client_id=spec["client_id"],
                       protocol=spec.get("protocol", 5))
    client.connect()
    client.subscribe(spec["topic"], qos=spec.get("qos", 1))
    ready(conn)
    with _profiled(spec.get("profile")):
        client.receive(spec["n"], read=spec["sub_read"])
    client.close()
    return {"t_first": client.first_rx, "t_last": client.last_rx,
            "received": client.received, "bytes": client.received_bytes}


def raw_sync(conn: Connection, spec: dict[str, Any]) -> dict[str, Any]:
    """On "go", subscribe to the state filter and receive the ``n`` retained messages."""
    env: BenchEnv = spec["env"]
    client = RawClient(env=env, member=spec["member"], client_id=spec["client_id"],
                       protocol=spec.get("protocol", 5))
    client.connect()
    ready(conn)
    _go_serving(conn, client)
    with _profiled(spec.get("profile")):
        t0 = time.monotonic()
        client.expect = spec["n"]
        client.subscribe(env.state_filter(), qos=1)
        client.receive(spec["n"], read=spec["sub_read"])
    client.close()
    return {"t_start": t0, "t_last": client.last_rx, "received": client.received,
            "retained": client.retained, "bytes": client.received_bytes}


# -- pear_mqtt ----------------------------------------------------------------------------

def pear_config(env: BenchEnv, member: str, node: str = NODE, *,
                outbox: Path | None = None, linger: float | None = None,
                market: bool = True, history: Path | bool | None = None) -> Any:
    """A consortium :class:`~pear_mqtt.types.NetworkConfig` for ``member`` (as the
    integration tests build one): aggregator key, group-key encryption; the
    in-memory outbox unless ``outbox`` names an SQLite file (sized to never drop here);
    ``linger`` overrides ``ReliabilityConfig.batch_linger`` (None: pear's default);
    ``history`` is where the sender keeps its history log (False: none, even beside an
    on-disk outbox; None: pear's default, a log next to an on-disk outbox only)."""
    from pear_mqtt.config.models import (
        EncryptionConfig,
        MarketConfig,
        NetworkConfig,
        PrivacyConfig,
        ReliabilityConfig,
        TLSConfig,
    )
    from pear_mqtt.model.insight import NetworkMode
    cert, key = env.cert(member)
    return NetworkConfig(
        mode=NetworkMode.CONSORTIUM, company_id=member, network_id=env.network, node_id=node,
        broker_url=f"mqtts://{env.host}:{env.port}",
        tls=TLSConfig(ca_file=env.ca, cert_file=cert, key_file=key),
        privacy=PrivacyConfig(aggregator_key_file=env.aggregator_pub),
        encryption=EncryptionConfig(keys={"k1": env.group_key}, active="k1"),
        reliability=ReliabilityConfig(
            outbox_path=outbox, outbox_max_bytes=4 * 1024**3,
            **({} if linger is None else {"batch_linger": linger}),
            **({"history": False} if history is False else
               {"history_path": history} if isinstance(history, Path) else {})),
        market=MarketConfig(enabled=market))


def make_insights(n: int, categories: int | None) -> list[Any]:
    """``n`` market insights cycling over ``categories`` categories (None: one each), each a
    distinct observation (its own product): the same observation sent again keeps its item
    id, and receivers would count it once."""
    from pear_mqtt.model.insight import MarketInsight, PriceData, SalesData, TrendData
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    start = end - timedelta(hours=1)
    out = []
    for i in range(n):
        cat = f"bench/c{i % categories:03d}" if categories else f"bench/c{i:06d}"
        price = 1.0 + (i % 997) * 0.37
        units = 10.0 + i % 113
        out.append(MarketInsight(
            category=cat, product_id=f"sku-{i}", region="north", window_start=start,
            window_end=end,
            price_data=PriceData(currency="EUR", price=price),
            sales_data=SalesData(units=units, revenue=units * price),
            trends=TrendData(price_change_pct=(i % 21) - 10.0, direction="up"),
            sample_size=17))
    return out


def _status(net: Any) -> dict[str, Any]:
    st = net.status()
    return {"messages_in": st.messages_in, "messages_out": st.messages_out,
            "dropped": dict(st.dropped), "duplicates": st.duplicates}


def pear_pub(conn: Connection, spec: dict[str, Any]) -> dict[str, Any]:
    """Broadcast ``n`` insights with ``broadcast_market_insight`` (``many``: with
    ``broadcast_many`` in batches of that many), then ``flush()``."""
    from pear_mqtt.node.network import PearNetwork
    env: BenchEnv = spec["env"]
    insights = make_insights(spec["n"], spec.get("categories"))
    outbox = None
    work = Path(tempfile.mkdtemp(prefix="outbox-", dir=env.root))
    if spec.get("outbox") == "sqlite":
        outbox = work / "outbox.sqlite"
    # With "history" the sender keeps its history log (docs/HISTORY.md), without it none.
    history: Path | bool = work / "history" if spec.get("history") else False

    async def main() -> dict[str, Any]:
        net = PearNetwork(pear_config(env, spec["member"], outbox=outbox, history=history))
        await net.connect(timeout=30)
        try:
            ready(conn)
            await _go_async(conn)
            with _profiled(spec.get("profile")):
                t0 = time.monotonic()
                many = spec.get("many")
                if many:
                    for i in range(0, len(insights), many):
                        await net.broadcast_many(insights[i:i + many])
                else:
                    for ins in insights:
                        await net.broadcast_market_insight(ins)
                t_queued = time.monotonic()
                await net.flush(timeout=600)
                t1 = time.monotonic()
            return {"t_start": t0, "t_queued": t_queued, "t_acked": t1, **_status(net)}
        finally:
            await net.disconnect()

    return asyncio.run(main())


def pear_rx(conn: Connection, spec: dict[str, Any]) -> dict[str, Any]:
    """Receive ``n`` verified insights through ``PearNetwork.insights()``."""
    from pear_mqtt.node.network import PearNetwork
    env: BenchEnv = spec["env"]
    n = spec["n"]

    async def main() -> dict[str, Any]:
        net = PearNetwork(pear_config(env, spec["member"], market=spec.get("market", True)))
        await net.connect(timeout=30)
        try:
            stream = net.insights()
            ready(conn)
            count, t_first, t_last, ids = 0, 0.0, 0.0, set()
            with _profiled(spec.get("profile")):
                async with asyncio.timeout(spec.get("timeout", 600)):
                    async for got in stream:
                        if count == 0:
                            t_first = time.monotonic()
                        ids.add(got.item_id)
                        count += 1
                        if count >= n:
                            t_last = time.monotonic()
                            break
                await net.market_settled(timeout=600)  # the store holds them all too
                t_stored = time.monotonic()
            return {"t_first": t_first, "t_last": t_last, "t_stored": t_stored,
                    "received": count,
                    "distinct": len(ids), **_status(net)}
        finally:
            await net.disconnect()

    return asyncio.run(main())


def pear_sync(conn: Connection, spec: dict[str, Any]) -> dict[str, Any]:
    """A late joiner: connect, then on "go" time ``PearNetwork.sync()``.

    With ``spec["gate"]`` the process starts (imports, config) at once but connects only on
    "connect": it must not receive the live insights published while the state is filled.
    """
    from pear_mqtt.node.network import PearNetwork
    env: BenchEnv = spec["env"]
    if spec.get("gate"):
        _go(conn, "connect")

    async def main() -> dict[str, Any]:
        net = PearNetwork(pear_config(env, spec["member"]))
        await net.connect(timeout=30)
        try:
            ready(conn)
            await _go_async(conn)
            with _profiled(spec.get("profile")):
                t0 = time.monotonic()
                result = await net.sync(timeout=600)
                t1 = time.monotonic()
            return {"t_start": t0, "t_last": t1, "received": len(result),
                    "sync_duration": result.duration, **_status(net)}
        finally:
            await net.disconnect()

    return asyncio.run(main())


WORKERS: dict[str, Callable[[Connection, dict[str, Any]], dict[str, Any]]] = {
    "raw_pub": raw_pub, "raw_sub": raw_sub, "raw_sync": raw_sync,
    "pear_pub": pear_pub, "pear_rx": pear_rx, "pear_sync": pear_sync,
}


def entry(conn: Connection, name: str, spec: dict[str, Any]) -> None:
    """Target of every spawned process: run worker ``name`` and report over ``conn``."""
    try:
        if name not in WORKERS:
            from .loadworkers import LOAD_WORKERS  # latency, fan-in: imported where used

            WORKERS.update(LOAD_WORKERS)
        result = WORKERS[name](conn, spec)
        conn.send(("done", result))
    except BaseException:  # report everything, including KeyboardInterrupt, then exit
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def profile_path(base: Path | None, name: str) -> str | None:
    """Where worker ``name`` dumps its profile, or None when not profiling."""
    return str(base / f"{name}.prof") if base is not None else None
