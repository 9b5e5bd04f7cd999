"""The market view: public aggregates per category over time, with the consortium's price
bands (the bucket histograms of its members' ``ranges_only`` prices), as chart series.

The dashboard joins the public network as a public node from up.json, with a market store
(docs/MARKET.md) of its own: every verified aggregate window it receives is kept there, so
the charts survive a restart of the dashboard, and the page reads them from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

from ..config.manager import NetworkConfigManager
from ..errors import PearError
from ..market import AggregateRow, HistogramRow, MarketStore
from ..node.network import PearNetwork
from ..ops.loopthread import LoopThread
from ..ops.up.state import NodeEntry
from .topology import Topology

__all__ = ["StoredAggregates", "market_series", "public_node"]

_SHOWN: Final = dt.timedelta(days=90)  # windows ending this long ago or less are charted
_PRICE_FIELDS: Final = ("price", "min_price", "max_price")

Bucket = tuple[float | None, float | None, int]


def _quantile_bucket(buckets: Sequence[Bucket], companies: int,
                     q: float) -> tuple[float | None, float | None]:
    """The bucket holding the ``q`` quantile company (for q = 0.5 and an even count, the
    lower of the two middle companies, as the bridge's own median)."""
    ordered = sorted(buckets, key=lambda b: (b[0] is not None, b[0] or 0.0))
    target = q * companies
    seen = 0
    for lo, hi, n in ordered:
        seen += n
        if seen >= target and n:
            return lo, hi
    return (ordered[-1][0], ordered[-1][1]) if ordered else (None, None)


def _band(h: HistogramRow) -> dict[str, Any]:
    lo, _ = _quantile_bucket(h.buckets, h.companies, 0.25)
    _, hi = _quantile_bucket(h.buckets, h.companies, 0.75)
    m_lo, m_hi = _quantile_bucket(h.buckets, h.companies, 0.5)
    mid = None if m_lo is None or m_hi is None else (m_lo + m_hi) / 2
    return {"field": h.field, "currency": h.currency, "companies": h.companies,
            "lo": lo if lo is not None else m_lo, "hi": hi if hi is not None else m_hi,
            "median_lo": m_lo, "median_hi": m_hi, "median": mid,
            "buckets": [{"lo": b[0], "hi": b[1], "companies": b[2]} for b in h.buckets]}


def market_series(aggregates: Iterable[AggregateRow],
                  histograms: Iterable[HistogramRow] = ()) -> list[dict[str, Any]]:
    """Per category and region, one point per window: every published statistic's mean
    (``stats``) and the price band (middle half of the companies' price buckets)."""
    Key = tuple[str, str, dt.datetime, dt.datetime]
    stats: dict[Key, dict[str, Any]] = {}
    for a in aggregates:
        stats.setdefault((a.category, a.region, a.window_start, a.window_end), {})[
            f"{a.group}.{a.field}"] = {"mean": a.mean, "stddev": a.stddev,
                                       "companies": a.companies, "currency": a.currency}
    hists: dict[Key, list[HistogramRow]] = {}
    for h in histograms:
        hists.setdefault((h.category, h.region, h.window_start, h.window_end), []).append(h)
    by_cell: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for key in sorted(stats.keys() | hists.keys(), key=lambda k: (k[0], k[1], k[2], k[3])):
        category, region, start, end = key
        price = sorted(hists.get(key, ()),
                       key=lambda h: (h.field not in _PRICE_FIELDS,
                                      _PRICE_FIELDS.index(h.field)
                                      if h.field in _PRICE_FIELDS else 0))
        by_cell.setdefault((category, region), []).append({
            "window_start": start.isoformat(), "window_end": end.isoformat(),
            "t": start.timestamp(), "stats": stats.get(key, {}),
            "band": _band(price[0]) if price else None})
    categories: dict[str, list[dict[str, Any]]] = {}
    for (category, region), points in sorted(by_cell.items()):
        categories.setdefault(category, []).append({"region": region, "points": points})
    return [{"category": c, "regions": regions} for c, regions in categories.items()]


def public_node(topology: Topology, name: str | None = None) -> NodeEntry | None:
    """The public node the dashboard reads as: ``name``, else the last public node (the
    first ones are the ones a developer tries things with)."""
    public = [n for n in topology.state.nodes if n.mode == "public"]
    if name is not None:
        return next((n for n in public if n.name == name), None)
    return public[-1] if public else None


class StoredAggregates:
    """A public participant in a thread of its own whose market store keeps every aggregate
    window it receives (the retained latest ones at once, each new one as the bridge
    publishes it); :meth:`snapshot` reads the charts' series from that store."""

    def __init__(self, topology: Topology, *, store: Path, node: str | None = None) -> None:
        self._topology = topology
        self._node = public_node(topology, node)
        self._path = store
        self._lock = threading.Lock()
        self._error: str | None = None if self._node else "no public node in up.json"
        self._connected = False
        self._store: MarketStore | None = None  # read-only, opened once the file exists
        self._runner = LoopThread("pear-dashboard-market", self._main)

    def start(self) -> None:
        if self._node is not None:
            self._runner.start()

    def close(self, timeout: float = 5.0) -> None:
        self._runner.close(timeout)
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    def _reader(self) -> MarketStore | None:
        """The store to read (its own read connection, kept), or None before it exists."""
        with self._lock:
            if self._store is None and self._path.exists():
                self._store = MarketStore.open(self._path, readonly=True)
            return self._store

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            error, connected = self._error, self._connected
        node = self._node
        series: list[dict[str, Any]] = []
        windows = 0
        since = dt.datetime.now(dt.UTC) - _SHOWN
        try:
            store = self._reader()
            if store is not None:
                aggregates = store.aggregates(since=since)
                series = market_series(aggregates, store.histograms(since=since))
                windows = len({(a.category, a.window_start) for a in aggregates})
        except PearError as exc:
            error = error or str(exc)
        return {"source": f"public aggregates kept in the market store {self._path}",
                "reader": None if node is None else f"{node.name} on {node.url}",
                "connected": connected, "error": error, "windows": windows,
                "categories": series}

    async def _main(self, stopping: asyncio.Event) -> None:
        node = self._node
        assert node is not None
        broker = next((b for b in self._topology.state.brokers if b.name == node.broker), None)
        try:
            config = NetworkConfigManager.default_config(
                "public", company_id=node.company, network_id=node.network,
                node_id=node.node, broker_url=node.url,
                tls={"ca_file": node.ca, "cert_file": node.cert, "key_file": node.key,
                     "crl_file": broker.crl if broker else None},
                market={"enabled": True, "path": self._path})
            network = PearNetwork(config)
            await network.connect(wait=False)
        except PearError as exc:
            with self._lock:
                self._error = str(exc)
            return
        watcher = asyncio.create_task(self._watch(network))
        await stopping.wait()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        with contextlib.suppress(PearError):
            await network.disconnect(flush_timeout=0)

    async def _watch(self, network: PearNetwork) -> None:
        while True:
            status = network.status()
            with self._lock:
                self._connected = bool(status.connected)
                self._error = status.last_error if not status.connected else None
            await asyncio.sleep(1.0)  # status poll for the page, not a message wait
