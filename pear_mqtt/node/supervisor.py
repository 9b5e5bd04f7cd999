"""A node's connection supervision: connect, reconnect with the project's backoff after a
loss, resubscribe, announce presence, and run the receiver and the flusher per connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Callable
from typing import Any

from ..backoff import retrying
from ..config.models import BrokerURL, NetworkConfig
from ..errors import ConnectError, PearError, TransportError
from ..failover import BrokerRing
from ..model.topics import TopicScheme
from ..privacy.filter import PrivacyFilter
from ..security.envelope import EnvelopeCodec
from ..security.tlscheck import tls_problems
from ..transport import Connection, Will, stop_task
from .checkpoints import CheckpointPages
from .counters import Counters
from .receiver import Receiver
from .sender import Sender
from .streams import Streams

__all__ = ["ConnectionSupervisor"]

log = logging.getLogger(__name__)


class ConnectionSupervisor:
    """Owns the broker connection of one node: :meth:`start` it, :meth:`stop` it (the
    node's streams are :attr:`~Streams.live` from one to the other)."""

    def __init__(self, *, config: NetworkConfig, clock: Callable[[], float],
                 counters: Counters, privacy: PrivacyFilter, receiver: Receiver,
                 sender: Sender, pages: CheckpointPages, streams: Streams,
                 read_only: bool = False) -> None:
        self.config = config
        # A watcher's session: its own client id, nothing kept by the broker, no presence.
        self._read_only = read_only
        self._clock = clock
        self._counters = counters
        self._filter = privacy
        self._receiver, self._sender, self._pages = receiver, sender, pages
        self._streams = streams
        self._codec: EnvelopeCodec | None = None
        self._scheme: TopicScheme | None = None
        self._conn: Connection | None = None
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._disconnected.set()
        self._connected_since: float | None = None
        self._last_error: str | None = None
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._session = uuid.uuid4().hex[:16]
        self._ring = BrokerRing(config.brokers)
        self._protocol: int | None = {"auto": None, "5": 5, "3.1.1": 4}[
            config.reliability.mqtt_version]

    def attach(self, *, codec: EnvelopeCodec, topics: TopicScheme) -> None:
        """Sign presence with ``codec`` and name topics with ``topics`` (on each connect)."""
        self._codec, self._scheme = codec, topics

    @property
    def running(self) -> bool:
        """Started and not stopped (connected or trying to be)."""
        return self._task is not None

    @property
    def connection(self) -> Connection | None:
        """The current broker connection (None before the first): its ``protocol`` is the
        MQTT version the broker accepted."""
        return self._conn

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def connected_since(self) -> float | None:
        return self._connected_since

    @property
    def last_error(self) -> str | None:
        """Why the latest connection attempt failed (None once connected)."""
        return self._last_error

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def wait_disconnected(self) -> None:
        await self._disconnected.wait()

    def start(self, first: asyncio.Future[None]) -> None:
        """Connect and keep connecting in the background; ``first`` resolves on the first
        connection (or fails with its :class:`ConnectError`)."""
        self._closing = False
        self._task = asyncio.create_task(self._supervise(first))
        self._streams.live = True

    async def stop(self) -> None:
        """Mark presence offline, close the connection and stop reconnecting."""
        self._closing = True
        conn = self._conn
        if conn is not None and conn.connected and self._codec is not None \
                and not self._read_only:
            assert self._scheme is not None
            with contextlib.suppress(PearError, TimeoutError):
                fut = conn.publish(self._scheme.presence(self.config.node_id),
                                   self._presence_payload(online=False), qos=1, retain=True)
                await asyncio.wait_for(fut, 2.0)
        if self._task is not None:
            await stop_task(self._task)
            self._task = None
            self._streams.live = False  # drained iterators end from here on
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            await stop_task(task)
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
        self._connected.clear()

    @property
    def broker(self) -> BrokerURL:
        """The broker this node is connected to, or tries next."""
        return self._ring.current

    def crash(self) -> None:
        """Drop the connection without DISCONNECT, as a crash would (the broker publishes
        the will), and stop reconnecting. A seam for tests of the last will; call
        ``disconnect()`` afterwards as usual."""
        if self._conn is not None:
            self._conn.abort()
        self._closing = True

    async def _supervise(self, first: asyncio.Future[None]) -> None:
        rel = self.config.reliability
        while not self._closing:
            try:
                async for attempt in retrying(minimum=rel.reconnect_min_delay,
                                              maximum=rel.reconnect_max_delay, on=ConnectError):
                    with attempt:
                        try:
                            conn = await self._open_connection()
                        except ConnectError as exc:
                            self._last_error = self._explain_refusal(exc)
                            log.info("connecting to %s failed: %s", self._ring.current, exc)
                            self._ring.failed()  # a cluster's next node, if it has several
                            raise
            except ConnectError as exc:
                if not first.done():
                    first.set_exception(exc)
                raise
            self._conn = conn
            try:
                await self._on_connected(conn)
            except PearError as exc:
                log.warning("setting up the connection failed: %s", exc)
                conn.abort()
                continue
            self._connected.set()
            self._disconnected.clear()
            self._connected_since = self._clock()
            self._last_error = None
            if not first.done():
                first.set_result(None)
            reader = asyncio.create_task(self._receiver.run(conn))
            flusher = asyncio.create_task(self._sender.run(conn))
            tasks = [reader, flusher]
            if not self._pages.seeded and not self._read_only:
                tasks.append(asyncio.create_task(self._pages.seed(conn)))
            self._tasks.update(tasks)
            try:
                await conn.closed.wait()
            finally:
                self._connected.clear()
                self._disconnected.set()
                for task in tasks:
                    await stop_task(task)
                    self._tasks.discard(task)
                self._sender.connection_lost()
            if not self._closing:
                self._counters.reconnects += 1
                log.info("connection to %s lost (%s); reconnecting", self._ring.current,
                         conn.close_reason)
                # When a broker restarts, all its clients see the loss at the same instant;
                # a random first delay spreads their reconnects instead of a storm.
                jitter = (rel.reconnect_jitter if rel.reconnect_jitter is not None
                          else 10 * rel.reconnect_min_delay)
                await asyncio.sleep(random.uniform(0, jitter))

    def _explain_refusal(self, exc: ConnectError) -> str:
        """The connect error, with what is wrong with our own TLS files when that is why
        (with TLS 1.3 a broker refuses an expired certificate by just closing the socket)."""
        tls = self.config.tls
        if tls.ca_file is None or tls.cert_file is None or tls.key_file is None:
            return str(exc)
        try:
            problems = tls_problems(ca_file=tls.ca_file, cert_file=tls.cert_file,
                                    key_file=tls.key_file)
        except (OSError, PearError):
            return str(exc)
        return "; ".join([*problems, str(exc)]) if problems else str(exc)

    async def _open_connection(self) -> Connection:
        assert self._codec is not None and self._scheme is not None
        rel = self.config.reliability
        self._session = uuid.uuid4().hex[:16]
        me = self._codec.signer.identity
        if self._read_only:
            conn = Connection(
                broker=self._ring.current, tls=self.config.tls, keepalive=rel.keepalive,
                client_id=f"pear-{me.member}-{me.node}-watch-{uuid.uuid4().hex[:8]}"[:128],
                clean_start=True, session_expiry=0, protocol=self._protocol)
        else:
            conn = Connection(
                broker=self._ring.current, client_id=f"pear-{me.member}-{me.node}"[:128],
                tls=self.config.tls, keepalive=rel.keepalive, clean_start=False,
                session_expiry=rel.session_expiry,
                will=Will(topic=self._scheme.presence(self.config.node_id),
                          payload=self._presence_payload(online=False), qos=1, retain=True),
                protocol=self._protocol)
        await conn.connect()
        self._protocol = conn.protocol  # reconnects skip the version probe
        return conn

    async def _on_connected(self, conn: Connection) -> None:
        assert self._scheme is not None
        t = self._scheme
        qos = self.config.reliability.qos
        filters: list[tuple[str, int]] = [(t.presence_filter(), 1), (t.live_filter(), qos)]
        if t.mode == "consortium":
            # The bridge's consortium aggregates (retained, so they arrive on connect too);
            # in public mode the live filter already is the aggregates'.
            filters.append((t.aggregates_filter(), 1))
        # Verified history: others' signed log heads (in public mode the bridge's), requests
        # for our log (or, an archive, any), our answers; and the bridge's receipts, entries
        # of its log beside the aggregates (read live, they are no gap to repair).
        node = self.config.node_id
        history: list[tuple[str, int]] = [] if self._read_only else [
            (t.log_head_filter(), 1), (t.log_request(node), 1), (t.log_reply(node), 1),
            *([(t.bridge_receipts_filter(), 1)] if t.mode != "private" else [])]
        if t.mode != "public":
            filters, history = filters + history, []
        granted = await conn.subscribe(filters, no_local=True)
        # The sync marker must come back to us, so that one subscription allows local echo.
        granted += await conn.subscribe([(t.sync_marker(self.config.node_id), 1)])
        if any(g >= 128 for g in granted):
            raise TransportError(f"broker refused a subscription: granted {granted}")
        if history and any(g >= 128 for g in await conn.subscribe(history, no_local=True)):
            # A public broker whose ACL predates the bridge's log: the aggregates still
            # arrive, only their log goes unchecked.
            log.warning("the public broker refused the bridge's history-log topics (its ACL "
                        "predates them: render it again); aggregates are not checked "
                        "against the bridge's log")
        if self._read_only:
            return
        await conn.publish(t.presence(self.config.node_id), self._presence_payload(online=True),
                           qos=1, retain=True)
        self._sender.wake()

    def _presence_payload(self, *, online: bool) -> bytes:
        assert self._codec is not None
        body = {"node": self.config.node_id, "online": online, "since": self._clock(),
                "session": self._session,
                "mode": self.config.mode.value,
                "levels": {g: lvl.value for g, lvl in self._filter.levels.items()}}
        return self._codec.encode(kind="presence", body=body)
