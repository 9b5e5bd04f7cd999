"""The market view: public aggregates per category over time, with the consortium's price
bands (the bucket histograms of its members' ``ranges_only`` prices), as chart series.

Until the market store (issue 18) is in the tree, the dashboard collects what a public
participant receives: it joins the public network with a public node certificate from
up.json and keeps every verified aggregate window it sees (docs/DASHBOARD.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterable
from typing import Any, Final

from ..config.manager import NetworkConfigManager
from ..errors import PearError
from ..model.aggregates import AggregateBody, PriceHistogram
from ..node.network import PearNetwork
from ..ops.up.state import NodeEntry
from .topology import Topology

__all__ = ["LiveAggregates", "market_series", "public_node"]

_MAX_WINDOWS: Final = 2000  # (category, window) pairs kept in memory, oldest dropped
_PRICE_FIELDS: Final = ("price", "min_price", "max_price")


def _quantile_bucket(h: PriceHistogram, q: float) -> tuple[float | None, float | None]:
    """The bucket holding the ``q`` quantile company (buckets in ascending order)."""
    ordered = sorted(h.buckets, key=lambda b: (b.lo is not None, b.lo or 0.0))
    target = q * h.companies
    seen = 0
    for b in ordered:
        seen += b.companies
        if seen >= target and b.companies:
            return b.lo, b.hi
    last = ordered[-1] if ordered else h.median
    return last.lo, last.hi


def _band(h: PriceHistogram) -> dict[str, Any]:
    lo, _ = _quantile_bucket(h, 0.25)
    _, hi = _quantile_bucket(h, 0.75)
    m = h.median
    mid = None if m.lo is None or m.hi is None else (m.lo + m.hi) / 2
    return {"field": h.field, "currency": h.currency, "companies": h.companies,
            "lo": lo if lo is not None else m.lo, "hi": hi if hi is not None else m.hi,
            "median_lo": m.lo, "median_hi": m.hi, "median": mid,
            "buckets": [{"lo": b.lo, "hi": b.hi, "companies": b.companies}
                        for b in h.buckets]}


def market_series(bodies: Iterable[AggregateBody]) -> list[dict[str, Any]]:
    """Per category and region, one point per window: every published statistic's mean
    (``stats``) and the price band (middle half of the companies' price buckets)."""
    by_cell: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for body in sorted(bodies, key=lambda b: (b.category, b.window_start)):
        for cell in body.cells:
            stats: dict[str, Any] = {}
            for group in cell.groups:
                for name, s in group.fields.items():
                    stats[f"{group.group}.{name}"] = {
                        "mean": s.mean, "stddev": s.stddev, "companies": s.companies,
                        "currency": group.currency}
            hists = sorted(cell.histograms or (),
                           key=lambda h: (h.field not in _PRICE_FIELDS,
                                          _PRICE_FIELDS.index(h.field)
                                          if h.field in _PRICE_FIELDS else 0))
            by_cell.setdefault((body.category, cell.region), []).append({
                "window_start": body.window_start.isoformat(),
                "window_end": body.window_end.isoformat(),
                "t": body.window_start.timestamp(),
                "stats": stats, "band": _band(hists[0]) if hists else None})
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


class LiveAggregates:
    """A public participant in a thread of its own, keeping every aggregate window it
    receives (the retained latest ones at once, each new one as the bridge publishes it)."""

    def __init__(self, topology: Topology, *, node: str | None = None) -> None:
        self._topology = topology
        self._node = public_node(topology, node)
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str], AggregateBody] = {}
        self._error: str | None = None if self._node else "no public node in up.json"
        self._connected = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._node is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="pear-dashboard-market",
                                        daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            bodies = list(self._windows.values())
            error, connected = self._error, self._connected
        node = self._node
        return {"source": "public aggregates received live",
                "reader": None if node is None else f"{node.name} on {node.url}",
                "connected": connected, "error": error, "windows": len(bodies),
                "categories": market_series(bodies)}

    def _keep(self, body: AggregateBody) -> None:
        with self._lock:
            self._windows[(body.category, body.window_start.isoformat())] = body
            if len(self._windows) > _MAX_WINDOWS:
                del self._windows[min(self._windows, key=lambda k: k[1])]

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        node = self._node
        assert node is not None
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        broker = next((b for b in self._topology.state.brokers if b.name == node.broker), None)
        config = NetworkConfigManager.default_config(
            "public", company_id=node.company, network_id=node.network, node_id=node.node,
            broker_url=node.url,
            tls={"ca_file": node.ca, "cert_file": node.cert, "key_file": node.key,
                 "crl_file": broker.crl if broker else None})
        network = PearNetwork(config)
        stream = network.aggregates()  # registered before connecting: retained ones too
        try:
            await network.connect(wait=False)
        except PearError as exc:
            with self._lock:
                self._error = str(exc)
            return
        reader = asyncio.create_task(self._read(stream))
        watcher = asyncio.create_task(self._watch(network))
        await self._stopping.wait()
        reader.cancel()
        watcher.cancel()
        await asyncio.gather(reader, watcher, return_exceptions=True)
        with contextlib.suppress(PearError):
            await network.disconnect(flush_timeout=0)

    async def _read(self, stream: Any) -> None:
        async for received in stream:
            self._keep(received.aggregate)

    async def _watch(self, network: PearNetwork) -> None:
        while True:
            status = network.status()
            with self._lock:
                self._connected = bool(status.connected)
                self._error = status.last_error if not status.connected else None
            await asyncio.sleep(1.0)  # status poll for the page, not a message wait
