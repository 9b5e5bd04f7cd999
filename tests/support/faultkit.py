"""Shared pieces of the fault scenarios: node configs, a counting receiver, memory and timing.

- :func:`node_config`: a consortium node of the test network pointed at any URL (a broker or
  a :class:`faultproxy.FaultProxy`), with an optional on-disk outbox.
- :class:`Collector`: counts, at a receiving :class:`PearNetwork`, the distinct insights by
  item id (what "delivered after de-duplication" means) and when they arrived, so a test
  waits on a count with a timeout instead of sleeping, and reads the recovery time.
- :class:`PeakRSS`: peak resident memory of this process over a scenario (Linux
  ``clear_refs`` resets the high-water mark, ``VmHWM`` reads it), and of a child by pid.
- :func:`stream`: broadcast ``n`` insights at a steady rate, collecting the accepted ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from brokers import GROUP_KEY, NetworkPKI

from pear_mqtt.config.models import (
    EncryptionConfig,
    NetworkConfig,
    PrivacyConfig,
    ReliabilityConfig,
)
from pear_mqtt.model.insight import MarketInsight, NetworkMode, PriceData, SalesData, TrendData
from pear_mqtt.node.network import PearNetwork
from pear_mqtt.node.records import ReceivedInsight

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def node_config(pki: NetworkPKI, aggregator_key: Path, member: str, url: str, *,
                node: str = "store-1", outbox: Path | None = None,
                mode: NetworkMode = NetworkMode.CONSORTIUM, cert: Any = None,
                **reliability: Any) -> NetworkConfig:
    """A node of ``pki.network`` connecting to ``url`` (fast reconnects unless overridden)."""
    return NetworkConfig(
        mode=mode, company_id=member, network_id=pki.network, node_id=node, broker_url=url,
        tls=pki.tls(cert if cert is not None else pki.node(member, node)),
        privacy=PrivacyConfig(aggregator_key_file=aggregator_key),
        encryption=EncryptionConfig(keys={"k1": GROUP_KEY}, active="k1"),
        reliability=ReliabilityConfig(**{"outbox_path": outbox, "reconnect_min_delay": 0.05,
                                         "reconnect_max_delay": 0.5, **reliability}))


def insight(i: int, category: str = "grocery/dairy") -> MarketInsight:
    """The ``i``-th test insight: its own observation (product), so every one has its own
    item id, and values that vary so every payload differs."""
    return MarketInsight(
        category=category, product_id=f"sku-{i}", region="north", window_start=T0,
        window_end=T0 + timedelta(hours=1),
        price_data=PriceData(currency="EUR", price=1.0 + i / 100),
        sales_data=SalesData(units=float(i), revenue=float(i) * 2.0),
        trends=TrendData(price_change_pct=0.5, direction="up"), sample_size=3)


class Collector:
    """Distinct insights a receiving node got, by item id, with their arrival times.

    Hooked on :meth:`PearNetwork.on_insight`, which fires once per item id (the node
    de-duplicates); the node's ``duplicates`` counter and its ``replayed`` drops are the
    redeliveries it removed.
    """

    def __init__(self, net: PearNetwork) -> None:
        self.net = net
        self.ids: dict[str, float] = {}  # item id -> monotonic arrival
        self.by_member: dict[str, int] = {}
        self._changed = asyncio.Event()
        net.on_insight(self._on)

    def _on(self, got: ReceivedInsight) -> None:
        self.ids.setdefault(got.item_id, time.monotonic())
        self.by_member[got.member] = self.by_member.get(got.member, 0) + 1
        self._changed.set()

    def __len__(self) -> int:
        return len(self.ids)

    async def wait_for(self, predicate: Callable[[Collector], bool], timeout: float,
                       what: str = "") -> None:
        """Until ``predicate(self)``; AssertionError naming the shortfall after ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate(self):
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}:"
                                 f" {len(self)} distinct insights received") from None

    async def wait_count(self, n: int, timeout: float) -> None:
        await self.wait_for(lambda c: len(c) >= n, timeout, f"{n} insights")

    async def wait_ids(self, ids: set[str], timeout: float) -> None:
        await self.wait_for(lambda c: ids <= c.ids.keys(), timeout,
                            f"{len(ids)} given insights")

    def first_after(self, t: float) -> float | None:
        """Seconds from monotonic ``t`` to the first insight that arrived after it."""
        later = [a for a in self.ids.values() if a >= t]
        return min(later) - t if later else None

    @property
    def duplicates(self) -> int:
        """Redeliveries removed: duplicate item ids plus envelopes dropped as replays."""
        st = self.net.status()
        return st.duplicates + st.dropped.get("replayed", 0)


async def stream(net: PearNetwork, n: int, *, rate: float, start: int = 0,
                 sent: list[str] | None = None,
                 on_each: Callable[[int], Any] | None = None) -> list[str]:
    """Broadcast insights ``start .. start+n-1`` at ``rate`` per second (0: flat out).

    Returns (and appends to ``sent``) the ids ``broadcast_market_insight`` returned, i.e.
    the insights the node accepted and owes delivery of.
    """
    out = sent if sent is not None else []
    interval = 1.0 / rate if rate > 0 else 0.0
    loop = asyncio.get_running_loop()
    due = loop.time()
    for i in range(start, start + n):
        out.append(await net.broadcast_market_insight(insight(i)))
        if on_each is not None:
            on_each(i)
        due += interval
        # Pacing the producer, not waiting for a message.
        await asyncio.sleep(max(0.0, due - loop.time()))
    return out


# -- memory ------------------------------------------------------------------------------------

def _status_kb(pid: int | str, field: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb(pid: int | str = "self") -> float | None:
    kb = _status_kb(pid, "VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb(pid: int | str = "self") -> float | None:
    """Peak resident set (VmHWM) of ``pid`` in MiB, None once it is gone."""
    kb = _status_kb(pid, "VmHWM")
    return None if kb is None else kb / 1024


class PeakRSS:
    """Peak RSS of this process during a scenario, and how far it rose above the start.

    Writing ``5`` to ``/proc/self/clear_refs`` resets the high-water mark to the current RSS,
    so earlier tests in the same pytest process do not count.
    """

    def __init__(self) -> None:
        # Without it the peak includes earlier tests: an over-estimate, still a bound.
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
        self.start = rss_mb() or 0.0

    @property
    def peak(self) -> float:
        return peak_rss_mb() or 0.0

    @property
    def growth(self) -> float:
        return self.peak - self.start


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
                     poll: float = 0.02) -> None:
    """Poll a condition that has no event (a file, a wall-clock instant) with a deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(poll)
