"""``PearNetwork.sync()``: the current retained state of everything a node may read,
complete by a marker's round trip and by what each sender's signed head names
(docs/DESIGN.md, "Sync and presence")."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from ..config.models import NetworkConfig
from ..errors import NotConnectedError, TransportError
from ..model.insight import NetworkMode
from ..model.topics import TopicScheme
from ..transport import Connection
from .counters import Counters
from .markers import Markers
from .receiver import Receiver
from .records import SyncResult
from .replicas import Replicas
from .supervisor import ConnectionSupervisor

__all__ = ["SYNC_PAGE_WAIT", "SYNC_ROUNDS", "Snapshot"]

log = logging.getLogger(__name__)

SYNC_PAGE_WAIT = 5.0
"""Seconds sync() waits, after its marker, for page versions senders' heads name."""
SYNC_ROUNDS = 20
"""Marker round trips at most, while each still brings heads or pages."""


class Snapshot:
    """Takes a node's snapshot of the network's retained state (:meth:`take`)."""

    def __init__(self, *, config: NetworkConfig, supervisor: ConnectionSupervisor,
                 markers: Markers, receiver: Receiver, counters: Counters) -> None:
        self._public = config.mode is NetworkMode.PUBLIC
        self._supervisor = supervisor
        self._markers = markers
        self._receiver = receiver
        self._counters = counters
        self._scheme: TopicScheme | None = None
        self._replicas: Replicas | None = None

    def attach(self, *, scheme: TopicScheme, replicas: Replicas | None) -> None:
        """The node's topics and what it holds of the others' logs (on each connect)."""
        self._scheme, self._replicas = scheme, replicas

    def missing(self) -> dict[str, int]:
        """Per sender, the checkpoint pages its signed head names that did not arrive."""
        return {} if self._replicas is None else self._replicas.missing_pages()

    async def take(self, *, timeout: float) -> SyncResult:
        """Subscribe to the state subtree, then publish a marker on a topic only this node
        uses: the broker sends the retained burst before it routes the later marker, so the
        marker's arrival proves the burst is complete, with no waiting on a timer."""
        await asyncio.wait_for(self._supervisor.wait_connected(), timeout)
        conn = self._supervisor.connection
        if conn is None:
            raise NotConnectedError("not connected")
        if self._scheme is None:
            raise NotConnectedError("call connect() first")
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                # Nodes' checkpoint pages carry their states (one signature per page); public
                # mode has no node state, only the bridge's retained aggregates.
                state_filter = (self._scheme.state_filter() if self._public
                                else self._scheme.checkpoint_filter())
                await conn.subscribe([(state_filter, 1)])
                await self._markers.round_trip(conn)
                if self._replicas is not None and not self._public:
                    await self._pages_complete(conn, self._replicas, started=started,
                                               timeout=timeout)
                if not self._public:  # public mode reads state and live aggregates as one
                    await conn.unsubscribe([state_filter])
        except TimeoutError:
            raise TransportError(f"sync did not complete within {timeout} s") from None
        missing = self.missing()
        if missing:
            log.warning("sync: checkpoint pages their signed heads name did not arrive from "
                        "%s; the snapshot lacks their states", missing)
        duration = time.perf_counter() - started
        self._counters.sync_duration.observe(duration)
        return SyncResult(states=dict(self._receiver.states), duration=duration,
                          aggregates=dict(self._receiver.aggregates), missing_pages=missing)

    async def _pages_complete(self, conn: Connection, replicas: Replicas, *, started: float,
                              timeout: float) -> None:
        """Complete by what each sender signed, not by message order: every page version its
        latest head names (a clustered broker may deliver retained pages after the marker,
        and in any order). Which senders there are is what arrived: another round trip
        that brings no further head or page ends the wait. Bounded: a page that never
        verifies (its sender's certificate expired) must not hold the snapshot back."""
        now = time.perf_counter()
        deadline = now + max(0.0, min(SYNC_PAGE_WAIT, timeout - (now - started)))
        for _ in range(SYNC_ROUNDS):
            with contextlib.suppress(TimeoutError):
                await replicas.wait(lambda: not replicas.missing_pages(),
                                    timeout=max(0.0, deadline - time.perf_counter()))
            before = replicas.seen()
            await self._markers.round_trip(conn)
            if replicas.seen() == before and not replicas.missing_pages():
                return
            if time.perf_counter() >= deadline:
                return
