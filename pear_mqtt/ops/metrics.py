"""Prometheus exposition of a node's or the bridge's counters (prometheus_client): a
collector that reads the component's status when scraped, so no hot path counts twice, and
a loopback HTTP endpoint. Metric names and what each means: docs/OPERATIONS.md."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ..errors import ConfigError
from ..model.insight import Histogram, NetworkStatus

if TYPE_CHECKING:  # node/ serves metrics through this module and never imports bridge/
    from ..bridge.status import BridgeStatus
__all__ = ["BridgeCollector", "MetricsServer", "NodeCollector", "serve"]


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _by_label(kind: type[CounterMetricFamily] | type[GaugeMetricFamily], name: str, doc: str,
              label: str, values: dict[str, Any]) -> Metric:
    family = kind(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], float(value))
    return family


def _histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    cumulative, buckets = 0, []
    for bound, n in zip((*map(str, h.bounds), "+Inf"), h.counts, strict=True):
        cumulative += n
        buckets.append((bound, float(cumulative)))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h.total)


class _CertExpiry:
    """Seconds until a certificate file expires (re-read when the file changes)."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._seen: tuple[float, dt.datetime] | None = None

    def seconds(self) -> float | None:
        if self._path is None:
            return None
        try:
            mtime = self._path.stat().st_mtime
            if self._seen is None or self._seen[0] != mtime:
                cert = x509.load_pem_x509_certificate(self._path.read_bytes())
                self._seen = (mtime, cert.not_valid_after_utc)
        except (OSError, ValueError):
            return None
        return (self._seen[1] - dt.datetime.now(dt.UTC)).total_seconds()


class NodeCollector(Collector):
    """A node's :class:`NetworkStatus` (an agent's, an archive's, any PearNetwork's)."""

    def __init__(self, status: Callable[[], NetworkStatus], *,
                 cert_file: Path | None = None) -> None:
        self._status = status
        self._cert = _CertExpiry(cert_file)

    def collect(self) -> Iterator[Metric]:
        st = self._status()
        yield _gauge("pear_connected", "1 while connected to the broker", float(st.connected))
        yield _gauge("pear_healthy", "1 while health is ok", float(st.health.value == "ok"))
        yield _counter("pear_messages_in", "Messages received", st.messages_in)
        yield _counter("pear_messages_out", "Messages published", st.messages_out)
        yield _counter("pear_insights_out", "Insights broadcast", st.insights_out)
        yield _counter("pear_insights_acknowledged", "Insights the broker acknowledged",
                       st.insights_acknowledged)
        yield _by_label(CounterMetricFamily, "pear_dropped", "Messages dropped, by reason",
                        "reason", st.dropped)
        yield _counter("pear_duplicates", "Redeliveries removed by de-duplication",
                       st.duplicates)
        yield _gauge("pear_outbox_depth", "Insights waiting in the outbox", st.outbox_depth)
        yield _counter("pear_reconnects", "Reconnects to the broker", st.reconnects)
        if st.latency_ms is not None:
            yield _gauge("pear_latency_seconds", "Recent broadcast-to-acknowledgement latency",
                         st.latency_ms / 1000)
        if st.last_sync is not None:
            yield _gauge("pear_last_sync_timestamp_seconds", "When sync() last completed",
                         st.last_sync.timestamp())
        yield _counter("pear_log_gaps", "Gaps seen in other nodes' history logs", st.log_gaps)
        yield _counter("pear_log_repaired", "Log entries repaired by requests", st.log_repaired)
        yield _counter("pear_log_unrepairable", "Log entries no holder could supply",
                       st.log_unrepairable)
        yield _counter("pear_log_forks", "Senders caught rewriting their history",
                       st.log_forks)
        yield _by_label(CounterMetricFamily, "pear_log_refused",
                        "Hostile history log traffic refused, by reason", "reason",
                        st.log_refused)
        yield _gauge("pear_market_rows", "Rows in the market store", st.market_rows)
        yield _gauge("pear_market_bytes", "Bytes of the market store on disk", st.market_bytes)
        yield _gauge("pear_market_failing", "1 while the market store refuses writes",
                     int(st.market_failing is not None))
        yield _gauge("pear_market_backlog", "Items waiting in memory for the market store",
                     st.market_backlog)
        yield _counter("pear_market_dropped",
                       "Items the market store's feed left out (backlog over its bound)",
                       st.market_dropped)
        if st.outbox_oldest is not None:
            yield _gauge("pear_outbox_oldest_age_seconds",
                         "Age of the oldest message waiting in the outbox",
                         max(0.0, (dt.datetime.now(dt.UTC) - st.outbox_oldest).total_seconds()))
        yield _histogram("pear_delivery_latency_seconds",
                         "Seconds from a live message's signing to its delivery here",
                         st.delivery_latency)
        yield _histogram("pear_sync_duration_seconds", "Seconds each sync() took",
                         st.sync_duration)
        expiry = self._cert.seconds()
        if expiry is not None:
            yield _gauge("pear_certificate_expiry_seconds",
                         "Seconds until this node's certificate expires", expiry)


class BridgeCollector(Collector):
    """The public bridge's :class:`BridgeStatus`."""

    def __init__(self, status: Callable[[], BridgeStatus], *,
                 cert_file: Path | None = None) -> None:
        self._status = status
        self._cert = _CertExpiry(cert_file)

    def collect(self) -> Iterator[Metric]:
        st = self._status()
        yield _gauge("pear_connected", "1 while every input and output is connected",
                     float(st.connected))
        yield _gauge("pear_healthy", "1 while health is ok", float(st.health.value == "ok"))
        yield _counter("pear_bridge_items_received", "Items the bridge received",
                       st.items_received)
        yield _counter("pear_bridge_items_counted", "Items counted into a window",
                       st.items_counted)
        yield _by_label(CounterMetricFamily, "pear_dropped", "Items dropped, by reason",
                        "reason", st.dropped)
        yield _by_label(CounterMetricFamily, "pear_bridge_cells_suppressed",
                        "Cells withheld, by reason (k, dominance, budget)", "reason",
                        st.suppressed)
        yield _counter("pear_bridge_cells_published", "Cells published", st.cells_published)
        yield _counter("pear_bridge_windows_published", "Windows published",
                       st.windows_published)
        yield _gauge("pear_bridge_windows_open", "Windows still taking items", st.windows_open)
        yield _gauge("pear_bridge_windows_awaiting_partials",
                     "Scale-out merger: windows waiting for an instance's partial",
                     len(st.partials_missing))
        yield _gauge("pear_outbox_depth", "Messages not yet acknowledged by the public broker",
                     st.outbox_depth)
        yield _by_label(GaugeMetricFamily, "pear_bridge_epsilon_spent",
                        "Differential-privacy budget spent, by period", "period",
                        st.epsilon_spent)
        if st.log_length is not None:
            yield _gauge("pear_bridge_log_length", "Entries in the bridge's history log",
                         st.log_length)
        if st.consortium_log_length is not None:
            yield _gauge("pear_bridge_consortium_log_length",
                         "Entries in the history log of the consortium's aggregates",
                         st.consortium_log_length)
        yield _counter("pear_bridge_log_requests_answered",
                       "History log repair requests the bridge answered",
                       st.log_requests_answered)
        expiry = self._cert.seconds()
        if expiry is not None:
            yield _gauge("pear_certificate_expiry_seconds",
                         "Seconds until the bridge's certificate expires", expiry)


@dataclass(frozen=True, slots=True)
class MetricsServer:
    """A running endpoint: its URL and how to stop it."""

    url: str
    _server: Any
    _thread: threading.Thread

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve(collector: Collector, *, port: int = 0, host: str = "127.0.0.1") -> MetricsServer:
    """Serve ``collector`` at ``http://host:port/metrics`` (port 0: a free one) on a thread."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}); "
                          "choose another --metrics-port (0 picks a free one)") from exc
    bound = server.server_port
    return MetricsServer(url=f"http://{host}:{bound}/metrics", _server=server, _thread=thread)
