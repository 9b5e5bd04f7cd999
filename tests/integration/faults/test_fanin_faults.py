"""Many agents reconnecting at once after a broker restart.

N store nodes are connected to one mosquitto with persistence on; the broker is killed (-9)
and started again, and every node broadcasts one insight while it is down. Each node is its
own company in private mode: in a consortium every node verifies every other node's signed
presence, N² messages that cost each real agent little but would cost this one test process
minutes (measured: 200 consortium nodes in one process spent ~40 s of CPU on presence alone).
What the scenario proves:

- reconnects are spread by the jittered first delay (``reconnect_jitter``), not a storm:
  the connection attempts reaching the broker after its restart (timed by a
  :class:`faultproxy.FaultProxy` in front of it, so this process's own scheduling does not
  blur them) are measured: the span from first to last and the most inside any 50 ms window;
- every node is back within a bound, and every insight broadcast while the broker was down
  reaches the broker and a subscriber (zero loss: a plain MQTT subscriber reads each node's
  retained state, verifies and decrypts the envelope, and counts the item ids);
- the memory of the process holding all N nodes stays bounded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from brokers import MosquittoBroker, NetworkPKI, probe
from faultkit import GROUP_KEY, PeakRSS, insight, wait_until
from faultproxy import FaultProxy
from faults_report import record

from pear_mqtt.config.models import EncryptionConfig, NetworkConfig
from pear_mqtt.errors import EnvelopeError
from pear_mqtt.model.insight import NetworkMode
from pear_mqtt.node.network import PearNetwork
from pear_mqtt.security.envelope import EnvelopeCodec
from pear_mqtt.security.signing import Signer
from pear_mqtt.security.trust import TrustStore

JITTER = 1.0  # reconnect_jitter: the first reconnect waits uniform(0, 1 s)


def _delivered(broker: MosquittoBroker, pki: NetworkPKI, n: int) -> tuple[set[str], int]:
    """Item ids in the retained state of every node, read by a plain subscriber."""
    reader = pki.node("globex")
    codec = EnvelopeCodec(signer=Signer.from_files(key_file=reader.key, cert_file=reader.cert),
                          trust=TrustStore.from_files(ca_files=[pki.ca]),
                          encryption=EncryptionConfig(keys={"k1": GROUP_KEY}, active="k1"))
    ids: set[str] = set()
    refused = 0
    with probe(broker, subscribe=["pear/v1/private/+/state/#"]) as sub:
        while len(ids) < n:
            msg, _ = sub.expect(lambda m: True, timeout=20)
            try:
                body = codec.decode(msg.payload, check_replay=False).message.body
            except EnvelopeError:
                refused += 1
                continue
            ids.add(body["iid"])
    return ids, refused


async def _restart_with_many_nodes(broker: MosquittoBroker, proxy: FaultProxy,
                                   pki: NetworkPKI, node: Callable[..., NetworkConfig], n: int
                                   ) -> dict[str, float | int]:
    mem = PeakRSS()
    # state_topics: what each node delivered is read back from its per-category state.
    nodes = [PearNetwork(node(f"f{i:04d}", proxy.url, mode=NetworkMode.PRIVATE,
                              reconnect_jitter=JITTER, reconnect_min_delay=0.5,
                              reconnect_max_delay=4.0, state_topics=True))
             for i in range(n)]
    try:
        for i in range(0, n, 50):  # in waves: a first start is not the scenario
            await asyncio.gather(*(x.connect(timeout=60) for x in nodes[i:i + 50]))
        db = broker.persistence_dir / "mosquitto.db"
        await wait_until(db.exists, 10, f"{db} (sessions saved)")
        await asyncio.to_thread(broker.kill)
        crashed = time.monotonic()
        await asyncio.gather(*(x.wait_disconnected(timeout=30) for x in nodes))
        # Broadcast while the broker is down: it waits in each node's outbox.
        sent = {await x.broadcast_market_insight(insight(i)) for i, x in enumerate(nodes)}
        await asyncio.to_thread(broker.start)
        t0 = time.monotonic()
        await asyncio.gather(*(x.wait_connected(timeout=60) for x in nodes))
        await asyncio.gather(*(x.flush(timeout=60) for x in nodes))
        flushed_in = time.monotonic() - t0
        back = time.monotonic() - t0
        # Every connect the broker saw after the crash: successful or not, that is its load.
        times = sorted(t for t in proxy.stats.accept_times if t >= crashed)
        reconnects = sum(x.status().reconnects for x in nodes)
    finally:
        await asyncio.gather(*(x.disconnect(flush_timeout=0) for x in nodes))
    delivered, refused = await asyncio.to_thread(_delivered, broker, pki, n)
    span = times[-1] - times[0]
    busiest = max(sum(1 for t in times if s <= t < s + 0.05) for s in times)
    last = back
    # Uniform over 1 s, n per second: a 50 ms window expects n/20; a storm puts them all in one.
    assert len(times) >= n
    assert span >= 0.5 * JITTER, f"{len(times)} connects within {span:.3f} s: a storm"
    assert busiest <= max(10, n // 5), f"{busiest} of {len(times)} connects within 50 ms"
    assert last <= JITTER + 10, f"the last node took {last:.1f} s to reconnect"
    assert reconnects >= n
    assert sent <= delivered and refused == 0, (len(sent - delivered), refused)
    assert mem.growth < 50 + n, f"memory rose {mem.growth:.0f} MB for {n} nodes"
    return {"n": n, "attempts": len(times), "span": span, "busiest": busiest, "last": last,
            "delivered": len(delivered & sent), "recovery": flushed_in,
            "peak": mem.peak, "growth": mem.growth, "duplicated": 0}


def _record(r: dict[str, float | int], *, soak: bool) -> None:
    n = int(r["n"])
    record(f"{n} agents reconnect after a broker kill -9 + restart", group="fan-in",
           sent=n, delivered=int(r["delivered"]), lost=n - int(r["delivered"]),
           duplicated=int(r["duplicated"]), recovery_s=float(r["recovery"]),
           peak_rss_mb=float(r["peak"]), soak=soak,
           notes=f"{r['attempts']} connects spread over {r['span']:.2f} s (jitter "
           f"{JITTER:g} s), at most {r['busiest']} in any 50 ms; all back {r['last']:.2f} s "
           f"after restart; one insight each, broadcast while down; recovery: restart → all "
           f"acknowledged; {n} private-mode nodes in one process (+{r['growth']:.0f} MB)",
           extra={"span_s": r["span"], "busiest_50ms": r["busiest"],
                  "last_reconnect_s": r["last"]})


async def test_200_agents_reconnect_spread_without_storm(
        mosquitto_factory: Callable[..., MosquittoBroker], pki: NetworkPKI,
        proxy_factory: Callable[[MosquittoBroker], FaultProxy],
        node: Callable[..., NetworkConfig]) -> None:
    broker = mosquitto_factory(persistence=True, autosave_interval=1)
    proxy = proxy_factory(broker)
    _record(await _restart_with_many_nodes(broker, proxy, pki, node, 200), soak=False)


@pytest.mark.soak
async def test_600_agents_reconnect_spread_without_storm(
        mosquitto_factory: Callable[..., MosquittoBroker], pki: NetworkPKI,
        proxy_factory: Callable[[MosquittoBroker], FaultProxy],
        node: Callable[..., NetworkConfig]) -> None:
    broker = mosquitto_factory(persistence=True, autosave_interval=1)
    proxy = proxy_factory(broker)
    _record(await _restart_with_many_nodes(broker, proxy, pki, node, 600), soak=True)
