"""A broker's own figures (mosquitto's ``$SYS/broker/#``) as Prometheus gauges: a monitor
identity subscribes to them on each broker and keeps the latest numeric value of each topic.
Names and rights: docs/OPERATIONS.md."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ..backoff import Backoff
from ..config.models import BrokerURL, TLSConfig
from ..errors import PearError
from ..transport import Connection
from .loopthread import LoopThread

__all__ = ["BrokerSys", "SysSource", "metric_name"]

log = logging.getLogger(__name__)

SYS_FILTER: Final = "$SYS/broker/#"
_NUMBER: Final = re.compile(r"\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")
_NAME_JUNK: Final = re.compile(r"[^a-z0-9]+")


@dataclass(frozen=True, slots=True, kw_only=True)
class SysSource:
    """One broker to read: its name (the ``broker`` label), URL and the monitor identity."""

    name: str
    url: str
    ca: Path
    cert: Path
    key: Path


def metric_name(topic: str) -> str | None:
    """``$SYS/broker/clients/connected`` → ``pear_broker_clients_connected``; the uptime in
    seconds gets its unit; None for a topic outside ``$SYS/broker/``."""
    prefix = "$SYS/broker/"
    if not topic.startswith(prefix) or len(topic) == len(prefix):
        return None
    tail = _NAME_JUNK.sub("_", topic[len(prefix):].lower()).strip("_")
    if not tail:
        return None
    return "pear_broker_uptime_seconds" if tail == "uptime" else f"pear_broker_{tail}"


def _value(payload: bytes) -> float | None:
    """The leading number of a ``$SYS`` payload ("1234", "0.52", "3600 seconds"), or None
    for text such as the version string."""
    match = _NUMBER.match(payload.decode("utf-8", "replace"))
    return float(match.group(1)) if match else None


class _BrokerCollector(Collector):
    def __init__(self, owner: BrokerSys, broker: str) -> None:
        self._owner = owner
        self._broker = broker

    def collect(self) -> Iterator[Metric]:
        values, connected = self._owner.values(self._broker)
        up = GaugeMetricFamily("pear_broker_sys_connected",
                               "1 while the monitor reads this broker's $SYS figures",
                               labels=["broker"])
        up.add_metric([self._broker], float(connected))
        yield up
        for name, value in sorted(values.items()):
            family = GaugeMetricFamily(name, f"mosquitto $SYS figure ({name})",
                                       labels=["broker"])
            family.add_metric([self._broker], value)
            yield family


class BrokerSys:
    """Reads ``$SYS`` of every broker in ``sources`` on a thread of its own, reconnecting
    with the project's backoff while a broker is away."""

    def __init__(self, sources: Sequence[SysSource]) -> None:
        self._sources = list(sources)
        self._lock = threading.Lock()
        self._values: dict[str, dict[str, float]] = {s.name: {} for s in self._sources}
        self._connected: dict[str, bool] = {s.name: False for s in self._sources}
        self._runner = LoopThread("pear-broker-sys", self._main)

    def start(self) -> None:
        if self._sources:
            self._runner.start()

    def close(self, timeout: float = 5.0) -> None:
        self._runner.close(timeout)

    def values(self, broker: str) -> tuple[dict[str, float], bool]:
        """The latest figures of ``broker`` by metric name, and whether it is read now."""
        with self._lock:
            return dict(self._values.get(broker, {})), self._connected.get(broker, False)

    def exposition(self, broker: str) -> bytes | None:
        """The Prometheus text of ``broker``'s figures; None for a broker not read here."""
        if broker not in self._values:
            return None
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_BrokerCollector(self, broker))
        return generate_latest(registry)

    async def _main(self, stopping: asyncio.Event) -> None:
        readers = [asyncio.create_task(self._read(s)) for s in self._sources]
        await stopping.wait()
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)

    async def _read(self, source: SysSource) -> None:
        backoff = Backoff(minimum=0.5, maximum=10.0)
        tls = TLSConfig(ca_file=source.ca, cert_file=source.cert, key_file=source.key)
        while True:
            conn = Connection(broker=BrokerURL.parse(source.url), tls=tls, clean_start=True,
                              session_expiry=0,
                              client_id=f"pear-monitor-{source.name}-{secrets.token_hex(4)}")
            try:
                await conn.connect(timeout=10.0)
                granted = await conn.subscribe([(SYS_FILTER, 0)])
                if not granted or granted[0] >= 128:
                    raise PearError(f"broker {source.name} refused {SYS_FILTER} to the "
                                    "monitor identity (its ACL lacks monitor_users)")
                self._set(source.name, connected=True)
                backoff.reset()
                async for msg in conn.messages():
                    name, value = metric_name(msg.topic), _value(msg.payload)
                    if name is not None and value is not None:
                        with self._lock:
                            self._values[source.name][name] = value
            except PearError as exc:
                # pear_broker_sys_connected 0 says so on the endpoint; the log says why.
                log.warning("$SYS of broker %s: %s", source.name, exc)
            finally:
                self._set(source.name, connected=False)
                with contextlib.suppress(PearError):
                    await conn.close()
            await asyncio.sleep(backoff.next_delay())  # reconnect backoff, not a message wait

    def _set(self, broker: str, *, connected: bool) -> None:
        with self._lock:
            self._connected[broker] = connected
