"""The output side of the running bridge: keeps a :class:`~pear_mqtt.bridge.output.BridgeOutput`
connected to its broker (the public's, or the consortium's), and sends its rows of the
store's outbox through it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from ..backoff import Backoff
from ..config.models import ReliabilityConfig, TLSConfig
from ..errors import ConnectError
from ..transport import Connection
from .config import BridgeConfig
from .endpoints import bridge_connection
from .output import BridgeOutput
from .state import BridgeStore
from .status import BridgeCounters

__all__ = ["Publisher"]

log = logging.getLogger(__name__)


class Publisher:
    """Connects ``output`` to its broker and flushes its rows of ``store``'s outbox;
    ``clock`` stamps acknowledgements. The broker is the public one, or for a consortium
    output the consortium's (with the bridge's consortium certificate)."""

    def __init__(self, *, config: BridgeConfig, output: BridgeOutput, store: BridgeStore,
                 counters: BridgeCounters, clock: Callable[[], float]) -> None:
        self._config = config
        self._output = output
        self._store = store
        self._counters = counters
        self._clock = clock
        if output.audience == "consortium":
            assert config.consortium is not None
            src = config.consortium
            url, tls, rel = src.broker_url, src.tls, src.reliability
        else:
            url, tls, rel = config.public.broker_url, config.public.tls, config.public.reliability
        self._url: str = url
        self._tls: TLSConfig = tls
        self._rel: ReliabilityConfig = rel

    @property
    def connected(self) -> bool:
        return self._output.connected

    def detach(self) -> Connection | None:
        """Stop using the output's connection and hand it back (to close it)."""
        return self._output.detach()

    async def run(self, *, first: asyncio.Future[None], closing: Callable[[], bool],
                  changed: asyncio.Event, work: asyncio.Event) -> None:
        """Keep the connection up until ``closing()``; resolve ``first`` once it is up
        the first time, and set ``work`` on every (re)connect so the outbox goes out."""
        rel = self._rel
        backoff = Backoff(minimum=rel.reconnect_min_delay, maximum=rel.reconnect_max_delay)
        # The public output keeps the client id it always had (its broker session).
        suffix = "out" if self._output.audience == "public" else "consortium-out"
        warned = False
        while not closing():
            conn = bridge_connection(url=self._url, tls=self._tls, rel=rel,
                                     client_id=f"pear-bridge-{self._config.bridge_id}-{suffix}")
            try:
                await conn.connect()
            except ConnectError as exc:
                conn.abort()
                log.info("bridge output (%s): %s", self._output.audience, exc)
                if not warned and not first.done():
                    log.warning("%s broker %s unreachable: %s", self._output.audience,
                                self._url, exc)
                    warned = True
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            self._output.attach(conn)
            if not first.done():
                first.set_result(None)
            work.set()
            changed.set()
            await conn.closed.wait()
            self._output.attach(None)
            changed.set()

    async def flush(self) -> None:
        """Send what the outbox holds, if connected, and mark what the broker acknowledged."""
        if not self._output.connected:
            return
        rows = self._store.pending(self._output.topic_root)
        if not rows:
            return
        acked = await self._output.send(rows)
        if acked:
            self._store.acknowledge(acked, now=self._clock())
            self._counters.messages_published += len(acked)
            self._counters.last_publish = datetime.now(UTC)
