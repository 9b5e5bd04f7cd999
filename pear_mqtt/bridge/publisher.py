"""The output side of the running bridge: keeps a :class:`~pear_mqtt.bridge.output.PublicOutput`
connected to its broker (the public one, or the consortium's for its own aggregates), and
sends the store's matching outbox through it; it also publishes the head of the bridge's
history log of what goes to that broker and answers requests for it (:mod:`.history`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from ..backoff import Backoff
from ..errors import ConnectError
from ..failover import BrokerRing
from ..transport import Connection
from .config import BridgeConfig, PublicConfig, SourceConfig
from .endpoints import bridge_connection
from .history import BridgeLog
from .output import Audience, PublicOutput
from .state import BridgeStore
from .status import BridgeCounters

__all__ = ["Publisher"]

log = logging.getLogger(__name__)


class Publisher:
    """Connects ``output`` and flushes ``store``'s outbox; ``clock`` stamps acknowledgements.

    ``audience="consortium"``: the consortium broker and the consortium outbox. ``tag``
    (default: the bridge id) names its MQTT client: one per scale-out instance and role.
    ``history``: the bridge's log, whose head goes out after what was sent and whose
    requests arrive over the same connection.
    """

    def __init__(self, *, config: BridgeConfig, output: PublicOutput, store: BridgeStore,
                 counters: BridgeCounters, clock: Callable[[], float],
                 audience: Audience = "public", tag: str | None = None,
                 history: BridgeLog | None = None) -> None:
        self._config = config
        self._tag = tag or config.bridge_id
        self._output = output
        self._store = store
        self._counters = counters
        self._clock = clock
        self._audience = audience
        self._history = history
        self._conn: Connection | None = None

    @property
    def connected(self) -> bool:
        return self._output.connected

    async def run(self, *, first: asyncio.Future[None], closing: Callable[[], bool],
                  changed: asyncio.Event, work: asyncio.Event) -> None:
        """Keep the public connection up until ``closing()``; resolve ``first`` once it is up
        the first time, and set ``work`` on every (re)connect so the outbox goes out."""
        pub: PublicConfig | SourceConfig | None = self._config.public
        suffix = "out"
        if self._audience == "consortium":
            pub, suffix = self._config.consortium, "cout"
        assert pub is not None
        backoff = Backoff(minimum=pub.reliability.reconnect_min_delay,
                          maximum=pub.reliability.reconnect_max_delay)
        warned = False
        ring = BrokerRing.of(pub.broker_url)
        while not closing():
            conn = bridge_connection(url=ring.current, tls=pub.tls, rel=pub.reliability,
                                     client_id=f"pear-bridge-{self._tag}-{suffix}")
            try:
                await conn.connect()
            except ConnectError as exc:
                conn.abort()
                log.info("bridge output: %s", exc)
                if not warned and not first.done():
                    log.warning("%s broker %s unreachable: %s", self._audience,
                                ring.current, exc)
                    warned = True
                ring.failed()
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            self._output.attach(conn)
            self._conn = conn
            if self._history is not None:
                await self._history.connected(conn)
            if not first.done():
                first.set_result(None)
            work.set()
            changed.set()
            await conn.closed.wait()
            self._output.attach(None)
            self._conn = None
            changed.set()

    async def flush(self) -> None:
        """Send what the outbox holds, if connected, and mark what the broker acknowledged."""
        if not self._output.connected:
            return
        consortium = self._audience == "consortium"
        rows = self._store.consortium_pending() if consortium else self._store.pending()
        if not rows:
            return
        acked = await self._output.send(rows)
        if acked:
            if consortium:
                self._store.acknowledge_consortium(acked)
            else:
                self._store.acknowledge(acked, now=self._clock())
            self._counters.messages_published += len(acked)
            self._counters.last_publish = datetime.now(UTC)
        if self._history is not None and self._conn is not None:
            await self._history.publish_head(self._conn)
