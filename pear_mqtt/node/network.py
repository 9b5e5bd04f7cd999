"""PearNetwork: a node's view of one network, over a real MQTT broker.

Outgoing: ``broadcast_market_insight`` applies the privacy filter, stores the result in the
outbox, and returns. A flusher task batches pending items per topic into one signed envelope
(one signature for many insights), publishes them pipelined at QoS 1, and deletes them from
the outbox only on PUBACK. The latest state per category is kept as a retained message.

Incoming: one reader task verifies each envelope, checks that the signer is the member the
topic names, de-duplicates items by id, and hands them to every ``insights()`` iterator and
callback. Anything wrong is dropped and counted by reason, never raised.

A supervisor task owns the connection: it reconnects with exponential backoff and full jitter
(tenacity), then resubscribes and re-announces presence.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import contextlib
import functools
import gc
import json
import logging
import os
import random
import time
import uuid
import zlib
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import ValidationError
from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from ..config.manager import NetworkConfigManager
from ..config.models import NetworkConfig
from ..errors import (
    ConnectError,
    EnvelopeError,
    NotConnectedError,
    OutboxError,
    OversizedMessage,
    PearError,
    TopicError,
    TransportError,
)
from ..model.aggregates import AggregateBody
from ..model.insight import Health, MarketInsight, NetworkMode, NetworkStatus
from ..model.topics import CHECKPOINT_PAGES, ParsedTopic, TopicScheme, parse_topic
from ..privacy.filter import PrivacyFilter, SharedInsight
from ..privacy.pseudonyms import Pseudonymizer
from ..security.envelope import EnvelopeCodec
from ..security.identity import Identity
from ..security.seal import Sealer, load_x25519_public_key
from ..security.tlscheck import tls_problems
from ..transport import Connection, InboundMessage, Will, stop_task
from .outbox import NewItem, Outbox, OutboxItem

__all__ = ["PearNetwork", "Peer", "ReceivedAggregate", "ReceivedInsight", "SyncResult"]

_T = TypeVar("_T")

log = logging.getLogger(__name__)

_DEDUP_MEMORY = 200_000  # item ids remembered for de-duplication
_SUBSCRIBER_QUEUE = 100_000  # unread insights per iterator before the oldest are dropped
_MAX_INFLIGHT_ENVELOPES = 256
# Bytes of unacknowledged envelopes (each also copied into paho's packet): a batch can be a few
# hundred kB, and a full count window of them would hold tens of MB for no gain in speed (on
# loopback half a MB in flight keeps the broker busy; the agent's RSS target is 60 MB).
_MAX_INFLIGHT_BYTES = 512 * 1024
# State checkpoints (Sparkplug's birth certificate, paged): besides one retained message per
# (node, category), a node keeps its current states in retained pages, each one signed and
# encrypted envelope holding the items of the state topics that hash to it. A late joiner
# reads a node's few pages instead of thousands of retained messages (one signature check per
# page, not per state). Refreshes are paced so that they cost about as much as the state
# traffic itself, whatever the update pattern: while states stream, a page is re-sent once the
# bytes changed in it reach its size (so it at most doubles each time); when a burst ends,
# the changed pages go out as a byte budget allows (the state bytes sent plus a trickle);
# flush() and disconnect() send whatever is pending at once.
_PAGE_BUDGET_TRICKLE = 64 * 1024  # page bytes per second allowed on top of the state bytes
_PAGE_BUDGET_CAP = 64 * 1024 * 1024
_PAGE_MIN_GROWTH = 16 * 1024  # changed bytes that justify a refresh mid-stream
_PAGE_MIN_INTERVAL = 1.0  # s between two refreshes of one page when a burst ends
_PAGE_RETRY_MAX = 5.0  # longest wait (s) before a deferred page is considered again
# broadcast_market_insight never has to wait, so a caller broadcasting in a tight loop would
# hold the event loop until it is done: nothing sent, no acks read, no keep-alives. It hands
# the loop over when this much time (s) has passed since it last did, so sending overlaps
# the caller's own work.
_BROADCAST_YIELD_INTERVAL = 0.001
# A broadcast starting this soon (s) after the previous one returned is "back to back": the
# caller is working through a backlog, and the flusher batches (see PearNetwork._linger).
_BACK_TO_BACK = 0.0002
# ... and this many of them since the flusher went idle start a batch: a paced sender that
# catches up after a stall makes one or two, a loop over a backlog dozens.
_BUSY_BACK_TO_BACK = 3
_MAX_LINGER_FACTOR = 10
_TOPIC_CACHE = 4096  # categories whose topic strings are kept
_STATE_MAX_DEFER = 1.0  # s a retained state may be held back while insights keep coming
# Retained states and pages sent per flusher round, so that a live insight never waits
# behind a whole batch of them (each costs a signature).
_BACKGROUND_PER_ROUND = 4
_MIDSTREAM_BUDGET = 0.0003  # s of a round that overdue states may take while insights flow
_BURST_END_BUDGET = 0.002  # s of signing held-back states between two looks for new insights
_BURST_END_BATCH = 256
_STATE_QUIET = 0.02  # s without a broadcast that ends a burst (held states go then)


@dataclass(frozen=True, slots=True)
class ReceivedInsight:
    """A verified insight as another node shared it."""

    item_id: str
    topic: str
    member: str  # the company as the topic and the signer's certificate name it
    node: str  # the signing node
    insight: SharedInsight
    retained: bool
    received_at: float
    sealed: str | None = None  # aggregated groups, sealed to the aggregator


@dataclass(frozen=True, slots=True)
class ReceivedAggregate:
    """A public aggregate as the bridge signed it (see docs/BRIDGE.md for the fields)."""

    topic: str
    aggregate: AggregateBody
    retained: bool
    received_at: float


class _Stream(Generic[_T]):
    """One iterator's buffer and its wake-up."""

    __slots__ = ("event", "queue")

    def __init__(self) -> None:
        self.queue: deque[_T] = deque()
        self.event = asyncio.Event()


@dataclass(frozen=True, slots=True)
class Peer:
    """A node seen through its retained presence."""

    member: str
    node: str
    online: bool
    since: float
    session: str = ""  # one per connection: its will and its announcement share it


@dataclass(frozen=True, slots=True)
class SyncResult:
    """The retained state a ``sync()`` collected: one latest insight per (node, category)."""

    states: dict[str, ReceivedInsight]
    duration: float
    # Public mode: the retained aggregates, one per category.
    aggregates: dict[str, ReceivedAggregate] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[ReceivedInsight]:
        return iter(self.states.values())


@dataclass(slots=True)
class _Counters:
    messages_in: int = 0
    messages_out: int = 0
    insights_in: int = 0
    insights_out: int = 0
    duplicates: int = 0
    reconnects: int = 0
    states_from_checkpoints: int = 0
    dropped: Counter[str] = field(default_factory=Counter)


class _MemoryOutbox:
    """The outbox when none is configured on disk: same contract, lost on exit."""

    def __init__(self) -> None:
        self._rows: dict[int, OutboxItem] = {}
        # Ids in id order, acknowledged ones included until the next compaction: pending()
        # finds its starting point by bisection instead of walking every held row (held-back
        # states and rows in flight stay at the front for a long time).
        self._order: list[int] = []
        self._keys: dict[str, int] = {}
        self._next = 1
        self.dropped: dict[str, int] = {}

    def put_insight(self, *, topic: str, payload: bytes, state_topic: str | None) -> None:
        """Store one insight (``contrib`` when ``state_topic`` is None) and its retained state,
        which replaces the pending one of that topic (``Outbox.put_many``'s contract, without
        the :class:`NewItem` checks: the caller built every value)."""
        now = time.time()
        rid = self._next
        size = len(payload)
        self._rows[rid] = OutboxItem(id=rid, topic=topic, payload=payload,
                                     kind="contrib" if state_topic is None else "insight",
                                     key=None, retain=False, created=now, size=size)
        self._order.append(rid)
        if state_topic is not None:
            old = self._keys.get(state_topic)
            if old is not None:
                self._rows.pop(old, None)
            rid += 1
            self._rows[rid] = OutboxItem(id=rid, topic=state_topic, payload=payload,
                                         kind="state", key=state_topic, retain=True,
                                         created=now, size=size)
            self._order.append(rid)
            self._keys[state_topic] = rid
        self._next = rid + 1

    def pending(self, *, limit: int, after_id: int = 0) -> list[OutboxItem]:
        out: list[OutboxItem] = []
        order, rows = self._order, self._rows
        i = bisect.bisect_right(order, after_id)
        while i < len(order) and len(out) < limit:
            row = rows.get(order[i])
            if row is not None:
                out.append(row)
            i += 1
        return out

    def ack(self, ids: list[int]) -> None:
        for rid in ids:
            row = self._rows.pop(rid, None)
            if row is not None and row.key is not None and self._keys.get(row.key) == rid:
                del self._keys[row.key]
        if len(self._order) > 2 * len(self._rows) + 1024:
            self._order = [rid for rid in self._order if rid in self._rows]

    @property
    def depth(self) -> int:
        return len(self._rows)

    def close(self) -> None:
        pass


class PearNetwork:
    """One node's membership in a pear_mqtt network.

    ::

        async with PearNetwork(config) as net:
            await net.broadcast_market_insight(insight)
            state = await net.sync()
            async for received in net.insights():
                ...
    """

    def __init__(self, config: NetworkConfig, *, outbox_path: Path | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self._outbox_path = outbox_path or config.reliability.outbox_path
        self._codec: EnvelopeCodec | None = None
        self._scheme: TopicScheme | None = None
        self._filter = PrivacyFilter(config=config)
        self._sealer: Sealer | None = None
        self._outbox: Outbox | _MemoryOutbox | None = None
        self._conn: Connection | None = None
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._disconnected.set()
        self._connected_since: float | None = None
        self._last_error: str | None = None
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._work = asyncio.Event()
        self._inflight_ids: set[int] = set()
        self._send_cursor = 0
        self._seen: OrderedDict[str, None] = OrderedDict()
        # One (buffer, wake-up) pair per open iterator, per stream.
        self._insight_streams: list[_Stream[ReceivedInsight]] = []
        self._aggregate_streams: list[_Stream[ReceivedAggregate]] = []
        self._aggregates: dict[str, ReceivedAggregate] = {}
        self._callbacks: list[Callable[[ReceivedInsight], Any]] = []
        self._states: dict[str, ReceivedInsight] = {}
        self._peers: dict[tuple[str, str], Peer] = {}
        self._peers_changed = asyncio.Event()
        self._sync_waiters: dict[bytes, asyncio.Future[None]] = {}
        self._last_sync: float | None = None
        self._latency: float | None = None
        self._counters = _Counters()
        self._session = uuid.uuid4().hex[:16]
        self._protocol: int | None = {"auto": None, "5": 5, "3.1.1": 4}[
            config.reliability.mqtt_version]
        self._idle = asyncio.Event()
        self._idle.set()
        # State checkpoint pages: page -> {state topic: '"<category>":<item JSON>'}. Pages
        # are sent only once ``_seeded`` (the node's earlier states were read back, so a
        # page never replaces a fuller one on the broker).
        self._pages: list[dict[str, bytes]] = [{} for _ in range(CHECKPOINT_PAGES)]
        self._dirty_pages: dict[int, None] = {}  # insertion order: oldest change first
        self._page_changed = [0] * CHECKPOINT_PAGES  # bytes changed since the page was sent
        self._page_sent = [0] * CHECKPOINT_PAGES  # size of the page when last sent
        self._page_sent_at = [0.0] * CHECKPOINT_PAGES  # monotonic time it was last sent
        self._page_budget = 0.0
        self._budget_at = time.monotonic()
        self._pages_inflight = 0
        self._force_pages = False
        self._page_timer: asyncio.TimerHandle | None = None
        self._seeded = config.mode is NetworkMode.PUBLIC
        self._seeding = False
        self._yielded_at = self._broadcast_at = time.monotonic()
        self._back_to_back = 0  # broadcasts that started right after the previous one returned
        self._category_topics: dict[str, tuple[str, str | None]] = {}
        # State rows held back while a burst lasts: key -> newest row, and since when.
        # Oldest change first. An OrderedDict: taking the first entry of a plain dict over and
        # over skips every slot emptied before it (quadratic with 100,000 held states).
        self._deferred_states: OrderedDict[str, OutboxItem] = OrderedDict()
        self._deferred_since = 0.0
        self._pages_cut = False  # the last _send_pages stopped at its limit

    # -- lifecycle -------------------------------------------------------------------------
    async def connect(self, *, timeout: float = 10.0, wait: bool = True) -> None:
        """Join the network.

        Checks the config (certificate paths present and readable), opens the outbox, and
        connects. With ``wait`` (default) it returns once connected or raises
        :class:`ConnectError` after ``timeout``; with ``wait=False`` it returns at once and
        keeps trying in the background (insights queue in the outbox meanwhile).
        """
        if self._supervisor is not None:
            return
        NetworkConfigManager.validate(self.config, for_connect=True)
        self._codec = EnvelopeCodec.from_config(self.config, clock=self._clock)
        if self._outbox_path is not None:
            # Kept next to the durable outbox: the node's other state across restarts.
            self._codec.persist_sequence(
                self._outbox_path.with_name(self._outbox_path.name + ".seq"))
        me = self._codec.signer.identity
        if me.network != self.config.network_id:
            raise ConnectError(f"certificate {self.config.tls.cert_file} is for network "
                               f"{me.network!r}, config says {self.config.network_id!r}")
        self._scheme = TopicScheme(mode=self.config.mode.value, network=self.config.network_id,
                                   member=me.member)
        if self.config.privacy.aggregator_key_file is not None:
            self._sealer = Sealer(load_x25519_public_key(self.config.privacy.aggregator_key_file))
        self._outbox = (Outbox(path=self._outbox_path,
                               max_bytes=self.config.reliability.outbox_max_bytes,
                               max_age=self.config.reliability.outbox_max_age)
                        if self._outbox_path is not None else _MemoryOutbox())
        self._closing = False
        if self._outbox.depth > 0:
            self._idle.clear()  # rows left by an earlier run still wait for their acks
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._supervisor = asyncio.create_task(self._supervise(first))
        if not wait:
            first.cancel()
            return
        try:
            await asyncio.wait_for(asyncio.shield(first), timeout)
        except TimeoutError:
            await self.disconnect()
            raise ConnectError(f"could not connect to {self.config.broker_url} within "
                               f"{timeout} s: {self._last_error or 'no answer'}") from None
        except PearError:
            await self.disconnect()
            raise

    async def disconnect(self, *, flush_timeout: float = 5.0) -> None:
        """Leave cleanly: wait up to ``flush_timeout`` s for unacknowledged insights, mark
        presence offline, and close. What is still unsent stays in the outbox (lost only when
        the outbox is in memory, i.e. no ``outbox_path`` is configured)."""
        if self._connected.is_set() and not self._idle.is_set() and flush_timeout > 0:
            self._force_pages = True
            self._work.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), flush_timeout)
        self._closing = True
        conn = self._conn
        if conn is not None and conn.connected and self._codec is not None:
            with contextlib.suppress(PearError, TimeoutError):
                fut = conn.publish(self._topics.presence(self.config.node_id),
                                   self._presence_payload(online=False), qos=1, retain=True)
                await asyncio.wait_for(fut, 2.0)
        if self._supervisor is not None:
            await stop_task(self._supervisor)
            self._supervisor = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            await stop_task(task)
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
        self._connected.clear()
        for streams in (self._insight_streams, self._aggregate_streams):
            for stream in streams:
                stream.event.set()
        if self._outbox is not None:
            self._outbox.close()
            self._outbox = None

    async def __aenter__(self) -> PearNetwork:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.disconnect()

    @property
    def _topics(self) -> TopicScheme:
        if self._scheme is None:
            raise NotConnectedError("call connect() first")
        return self._scheme

    @property
    def identity(self) -> Identity:
        """This node's identity as its certificate states it."""
        if self._codec is None:
            raise NotConnectedError("call connect() first")
        return self._codec.signer.identity

    # -- connection supervision -------------------------------------------------------------
    async def _supervise(self, first: asyncio.Future[None]) -> None:
        rel = self.config.reliability
        while not self._closing:
            try:
                async for attempt in AsyncRetrying(
                        wait=wait_random_exponential(multiplier=rel.reconnect_min_delay,
                                                     max=rel.reconnect_max_delay),
                        retry=retry_if_exception_type(ConnectError), reraise=True):
                    with attempt:
                        try:
                            conn = await self._open_connection()
                        except ConnectError as exc:
                            self._last_error = self._explain_refusal(exc)
                            log.info("connecting to %s failed: %s", self.config.broker_url, exc)
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
            reader = asyncio.create_task(self._read_loop(conn))
            flusher = asyncio.create_task(self._flush_loop(conn))
            tasks = [reader, flusher]
            if not self._seeded:
                tasks.append(asyncio.create_task(self._seed_pages(conn)))
            self._tasks.update(tasks)
            try:
                await conn.closed.wait()
            finally:
                self._connected.clear()
                self._disconnected.set()
                for task in tasks:
                    await stop_task(task)
                    self._tasks.discard(task)
                self._inflight_ids.clear()
                self._send_cursor = 0
                self._deferred_states.clear()  # still in the outbox: fetched again
            if not self._closing:
                self._counters.reconnects += 1
                log.info("connection to %s lost (%s); reconnecting", self.config.broker_url,
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
        rel = self.config.reliability
        self._session = uuid.uuid4().hex[:16]
        conn = Connection(
            broker=self.config.broker, client_id=self._client_id(), tls=self.config.tls,
            keepalive=rel.keepalive, clean_start=False, session_expiry=rel.session_expiry,
            will=Will(topic=self._topics.presence(self.config.node_id),
                      payload=self._presence_payload(online=False), qos=1, retain=True),
            protocol=self._protocol)
        await conn.connect()
        self._protocol = conn.protocol  # reconnects skip the version probe
        return conn

    def _client_id(self) -> str:
        me = self.identity
        return f"pear-{me.member}-{me.node}"[:128]

    async def _on_connected(self, conn: Connection) -> None:
        t = self._topics
        qos = self.config.reliability.qos
        granted = await conn.subscribe(
            [(t.presence_filter(), 1), (t.live_filter(), qos)], no_local=True)
        # The sync marker must come back to us, so that one subscription allows local echo.
        granted += await conn.subscribe([(t.sync_marker(self.config.node_id), 1)])
        if any(g >= 128 for g in granted):
            raise TransportError(f"broker refused a subscription: granted {granted}")
        await conn.publish(t.presence(self.config.node_id), self._presence_payload(online=True),
                           qos=1, retain=True)
        self._work.set()

    def _presence_payload(self, *, online: bool) -> bytes:
        assert self._codec is not None
        body = {"node": self.config.node_id, "online": online, "since": self._clock(),
                "session": self._session,
                "mode": self.config.mode.value,
                "levels": {g: lvl.value for g, lvl in self._filter.levels.items()}}
        return self._codec.encode(kind="presence", body=body)

    # -- publishing --------------------------------------------------------------------------
    async def broadcast_market_insight(self, insight: MarketInsight) -> str:
        """Share ``insight`` as the privacy policy allows; returns its item id.

        Returns once the filtered insight is in the outbox (on disk when one is configured);
        delivery continues in the background. ``flush()`` waits for the broker's acks.
        """
        if self._outbox is None or self._scheme is None:
            raise NotConnectedError("call connect() before broadcasting")
        if time.monotonic() - self._broadcast_at < _BACK_TO_BACK:
            self._back_to_back += 1  # the caller produces insights as fast as it can
        result = self._filter.encode(insight)
        item_id = os.urandom(16).hex()
        # The item is spliced from the filter's JSON (one serialisation, no dict round trip);
        # the id is hex and the sealed token base64url, so neither needs escaping.
        parts = [b'{"iid":"', item_id.encode(), b'","insight":', result.shared]
        if result.contribution is not None and self._sealer is not None:
            token = self._sealer.seal(result.contribution)
            parts += [b',"sealed":"', token.encode(), b'"']
        elif result.contribution is not None:
            self._counters.dropped["aggregated_without_aggregator_key"] += 1
        parts.append(b"}")
        payload = b"".join(parts)
        topics = self._category_topics.get(insight.category)
        if topics is None:
            topics = self._topics_for(insight.category)
        live_topic, state_topic = topics
        try:
            if isinstance(self._outbox, _MemoryOutbox):
                self._outbox.put_insight(topic=live_topic, payload=payload,
                                         state_topic=state_topic)
            else:
                new = [NewItem(topic=live_topic, payload=payload,
                               kind="contrib" if state_topic is None else "insight")]
                if state_topic is not None:
                    new.append(NewItem(topic=state_topic, payload=payload, kind="state",
                                       key=state_topic, retain=True))
                self._outbox.put_many(new)
        except OutboxError:
            self._counters.dropped["outbox_refused"] += 1  # the caller gets the error too
            raise
        self._counters.insights_out += 1
        self._idle.clear()
        self._work.set()
        now = self._broadcast_at = time.monotonic()
        if now - self._yielded_at >= _BROADCAST_YIELD_INTERVAL:
            self._yielded_at = now
            await asyncio.sleep(0)
        return item_id

    def _topics_for(self, category: str) -> tuple[str, str | None]:
        """(live topic, state topic or None in public mode) of ``category``, remembered."""
        live = self._topics.insights(category)
        state = (None if self.config.mode is NetworkMode.PUBLIC
                 else self._topics.state(self.config.node_id, category))
        if len(self._category_topics) >= _TOPIC_CACHE:
            self._category_topics.clear()
        self._category_topics[category] = (live, state)
        return live, state

    async def flush(self, *, timeout: float | None = None) -> None:
        """Wait until the broker acknowledged everything broadcast so far, including the
        state checkpoint pages late joiners read."""
        self._force_pages = True
        self._work.set()
        async with asyncio.timeout(timeout):
            await self._idle.wait()
            conn = self._conn
            if conn is not None and conn.connected:
                # Some brokers (amqtt) acknowledge a QoS 1 PUBLISH before they store or route
                # it; our own marker coming back proves the broker has processed everything
                # we sent before it.
                with contextlib.suppress(TransportError):
                    await self._marker(conn)

    async def _flush_loop(self, conn: Connection) -> None:
        assert self._outbox is not None and self._codec is not None
        window = _Window(count=_MAX_INFLIGHT_ENVELOPES, nbytes=_MAX_INFLIGHT_BYTES)
        rel = self.config.reliability
        while not conn.closed.is_set():
            idle_count, idle_b2b = self._counters.insights_out, self._back_to_back
            await self._work.wait()
            self._work.clear()
            # Batching only pays when the caller produces insights as fast as it can (a loop
            # over a backlog): then lingering turns them into fewer, larger envelopes. An
            # insight from a paced stream, however fast, goes at once: waiting would only add
            # latency. Counted from when the flusher went idle, so that what came during its
            # own lingering and sending does not keep it lingering.
            busy = (self._counters.insights_out - idle_count >= 2
                    and self._back_to_back - idle_b2b >= _BUSY_BACK_TO_BACK)
            if rel.batch_linger > 0 and busy:
                await self._linger(rel.batch_linger, rel.batch_max_items)
            while not conn.closed.is_set():
                rows = self._outbox.pending(limit=rel.batch_max_items * 2,
                                            after_id=self._send_cursor)
                if not rows:
                    ended = True  # the burst is over: held states and pages may all go
                    if self._deferred_states and not self._force_pages:
                        now = time.monotonic()
                        quiet = now - self._broadcast_at
                        if quiet < _STATE_QUIET:
                            if now - self._deferred_since < _STATE_MAX_DEFER:
                                # Insights are still coming: hold the states a little longer.
                                self._schedule_pages(_STATE_QUIET - quiet)
                                break
                            # Overdue while insights still come: small slices with the loop
                            # handed over between them, so a paced stream's next insight
                            # never waits behind milliseconds of signing.
                            ended = False
                    if not (await self._send_states(
                                conn, window,
                                limit=_BURST_END_BATCH if ended else _BACKGROUND_PER_ROUND,
                                budget=_BURST_END_BUDGET if ended else _MIDSTREAM_BUDGET)
                            and await self._send_pages(conn, window, burst_end=ended,
                                                       limit=_BACKGROUND_PER_ROUND)):
                        return
                    if self._deferred_states or self._pages_cut:
                        # One slice at a time: a new insight goes out ahead of the rest.
                        await asyncio.sleep(0)
                        continue
                    self._maybe_idle()
                    break
                self._send_cursor = rows[-1].id
                live = []
                for row in rows:
                    if row.kind != "state":
                        live.append(row)
                        continue
                    if not self._deferred_states:
                        self._deferred_since = time.monotonic()
                    # A newer state of the same category replaces the held one in the outbox
                    # too, so only the newest is ever signed and sent.
                    self._deferred_states.pop(row.key or row.topic, None)
                    self._deferred_states[row.key or row.topic] = row
                for batch in _batches(live, rel.batch_max_items):
                    if not await self._send_batch(conn, window, batch):
                        return
                # Mid-stream, what is overdue goes a little per round (about a third of a
                # millisecond of signing), so the live insights between never stall.
                if (self._deferred_states
                        and time.monotonic() - self._deferred_since >= _STATE_MAX_DEFER
                        and not await self._send_states(conn, window,
                                                        limit=_BACKGROUND_PER_ROUND,
                                                        budget=_MIDSTREAM_BUDGET)):
                    return
                if not await self._send_pages(conn, window, burst_end=False, limit=1):
                    return

    async def _send_batch(self, conn: Connection, window: _Window,
                          batch: list[OutboxItem]) -> bool:
        """Sign and publish ``batch``; False if the connection broke."""
        for payload, ids in self._encode(batch):
            await window.acquire(len(payload))
            try:
                self._publish(conn, batch[0], payload, ids, window)
            except TransportError as exc:  # includes NotConnectedError
                window.release(len(payload))
                log.info("publish stopped: %s", exc)
                return False
        return True

    async def _send_states(self, conn: Connection, window: _Window, *, limit: int,
                           budget: float | None = None) -> bool:
        """Send up to ``limit`` held-back retained states, one message each (oldest change
        first), and no more once ``budget`` seconds went into it; False if the connection
        broke.

        During a burst a category's state changes with every insight; it only has to reach
        the broker eventually (the live insight already went out), so it waits for the burst
        to end, or :data:`_STATE_MAX_DEFER` at most, and one signature covers many updates.
        """
        started = time.monotonic()
        for _ in range(limit):
            if not self._deferred_states or (
                    budget is not None and time.monotonic() - started > budget):
                break
            _key, row = self._deferred_states.popitem(last=False)
            if not await self._send_batch(conn, window, [row]):
                return False
        return True

    async def _linger(self, linger: float, batch_max: int) -> None:
        """Let a burst gather into one batch: ``linger`` seconds, and more while insights keep
        coming back to back, up to :data:`_MAX_LINGER_FACTOR` times ``linger`` or a full
        batch.

        Each envelope costs a signature here and a verification at every receiver (~25 and
        ~60 µs), so a caller working through a backlog would spend much of its time on
        envelopes of two or three insights (one topic per category) unless the flusher waits
        a little longer.
        """
        started = self._counters.insights_out
        waited = 0.0
        while True:
            before = self._back_to_back
            await asyncio.sleep(linger)
            waited += linger
            if (self._back_to_back - before < 2 or waited >= _MAX_LINGER_FACTOR * linger
                    or self._counters.insights_out - started >= batch_max):
                return

    def _maybe_idle(self) -> None:
        if (self._outbox is not None and not self._inflight_ids and self._outbox.depth == 0
                and not self._dirty_pages and not self._pages_inflight):
            self._force_pages = False  # flush() is satisfied
            self._idle.set()

    async def _send_pages(self, conn: Connection, window: _Window, *,
                          burst_end: bool, limit: int) -> bool:
        """Send the changed checkpoint pages the pacing allows (all of them after
        :meth:`flush`), ``limit`` at most (``_pages_cut`` tells whether more were due);
        False if the connection broke."""
        self._pages_cut = False
        if not self._dirty_pages or not self._seeded:
            return True
        sent = 0
        assert self._codec is not None
        now = time.monotonic()
        self._page_budget = min(_PAGE_BUDGET_CAP, self._page_budget
                                + (now - self._budget_at) * _PAGE_BUDGET_TRICKLE)
        self._budget_at = now
        node_json = json.dumps(self.config.node_id).encode()
        for page in list(self._dirty_pages):
            if sent >= limit:
                self._pages_cut = True
                break
            entries = self._pages[page]
            if not burst_end:
                # Mid-stream, even after flush(): the page is complete only once the burst is.
                if self._page_changed[page] < max(self._page_sent[page], _PAGE_MIN_GROWTH):
                    continue
            elif not self._force_pages:
                if now - self._page_sent_at[page] < _PAGE_MIN_INTERVAL:
                    # A trickle of updates must not re-send (and re-sign) the page each time.
                    self._schedule_pages(self._page_sent_at[page] + _PAGE_MIN_INTERVAL - now)
                    continue
                if self._page_budget < self._page_sent[page]:
                    self._schedule_pages((self._page_sent[page] - self._page_budget)
                                         / _PAGE_BUDGET_TRICKLE)
                    return True
            body = b'{"node":%s,"page":%d,"states":{%s}}' % (node_json, page,
                                                               b",".join(entries.values()))
            if burst_end and not self._force_pages:
                self._page_budget = max(0.0, self._page_budget - len(body))
            del self._dirty_pages[page]
            self._page_changed[page] = 0
            self._page_sent[page] = len(body)
            self._page_sent_at[page] = now
            try:
                payload = self._codec.encode_json(kind="checkpoint", body_json=body)
            except OversizedMessage:
                # Left out of the snapshot and counted: late joiners then lack these states
                # until the page fits again (a smaller node, or a larger message limit).
                self._counters.dropped["checkpoint_oversized"] += 1
                log.warning("checkpoint page %d of %d states exceeds the message size limit",
                            page, len(entries))
                continue
            await window.acquire(len(payload))
            try:
                fut = conn.publish(self._topics.checkpoint(self.config.node_id, page), payload,
                                   qos=1, retain=True)
            except TransportError as exc:
                window.release(len(payload))
                self._dirty_pages[page] = None
                log.info("publish stopped: %s", exc)
                return False
            self._pages_inflight += 1
            sent += 1
            fut.add_done_callback(functools.partial(self._page_done, page=page, window=window,
                                                    nbytes=len(payload)))
        return True

    def _schedule_pages(self, delay: float) -> None:
        if self._page_timer is None or self._page_timer.cancelled():
            def wake() -> None:
                self._page_timer = None
                self._work.set()
            self._page_timer = asyncio.get_running_loop().call_later(
                min(max(delay, 0.05), _PAGE_RETRY_MAX), wake)

    def _page_done(self, f: asyncio.Future[None], *, page: int,
                   window: _Window, nbytes: int) -> None:
        window.release(nbytes)
        self._pages_inflight -= 1
        if f.cancelled() or f.exception() is not None:
            self._dirty_pages[page] = None  # sent again after reconnecting
            return
        self._maybe_idle()

    def _keep_state(self, topic: str, item_json: bytes, *, only_new: bool = False) -> None:
        """Record a state item for its checkpoint page."""
        page = zlib.crc32(topic.encode()) % CHECKPOINT_PAGES
        entries = self._pages[page]
        if only_new and topic in entries:
            return
        category = self._topics.category_of_state(self.config.node_id, topic)
        entry = b"%s:%s" % (json.dumps(category).encode(), item_json)
        entries[topic] = entry
        self._dirty_pages[page] = None
        self._page_changed[page] += len(entry)
        self._page_budget += len(entry)

    async def _seed_pages(self, conn: Connection) -> None:
        """Read back this node's retained states (an earlier run's), so that the first page
        it sends holds them too."""
        t = self._topics
        self._seeding = True
        try:
            await conn.subscribe([(t.node_state_filter(self.config.node_id), 1)])
            await self._marker(conn)
            await conn.unsubscribe([t.node_state_filter(self.config.node_id)])
        finally:
            self._seeding = False
        self._seeded = True
        self._work.set()

    def _encode(self, batch: list[OutboxItem]) -> list[tuple[bytes, list[int]]]:
        """Sign ``batch`` as one envelope, or as several when it is over the size limit."""
        assert self._codec is not None
        try:
            # Rows hold each item's JSON as the outbox stored it: join, don't re-serialise.
            if batch[0].kind == "state":
                payload = self._codec.encode_json(kind="state", body_json=batch[-1].payload)
                self._keep_state(batch[-1].topic, batch[-1].payload)
            else:
                payload = self._codec.encode_json(
                    kind="insights",
                    body_json=b'{"items":[' + b",".join(r.payload for r in batch) + b"]}")
        except OversizedMessage:
            if len(batch) == 1:
                # One insight larger than the envelope limit can never be sent.
                self._counters.dropped["oversized_outgoing"] += 1
                self._ack_rows([batch[0].id])
                return []
            half = len(batch) // 2
            return self._encode(batch[:half]) + self._encode(batch[half:])
        return [(payload, [r.id for r in batch])]

    def _publish(self, conn: Connection, first: OutboxItem, payload: bytes, ids: list[int],
                 window: _Window) -> None:
        rel = self.config.reliability
        fut = conn.publish(first.topic, payload, qos=rel.qos, retain=first.retain,
                           expiry=rel.message_expiry if first.retain else None)
        self._inflight_ids.update(ids)
        self._counters.messages_out += 1
        sent_at = time.perf_counter()

        nbytes = len(payload)

        def done(f: asyncio.Future[None]) -> None:
            window.release(nbytes)
            self._inflight_ids.difference_update(ids)
            if f.cancelled() or f.exception() is not None:
                return  # the rows stay in the outbox and are sent again after reconnecting
            rtt = (time.perf_counter() - sent_at) * 1000
            self._latency = rtt if self._latency is None else 0.9 * self._latency + 0.1 * rtt
            self._ack_rows(ids)

        fut.add_done_callback(done)

    def _ack_rows(self, ids: list[int]) -> None:
        if self._outbox is None:
            return
        try:
            self._outbox.ack(ids)
        except OutboxError as exc:
            # The rows stay and are sent again: receivers de-duplicate by item id.
            log.error("outbox could not record acknowledgements: %s", exc)
            self._counters.dropped["outbox_ack_failed"] += 1
            return
        self._maybe_idle()

    # -- receiving ---------------------------------------------------------------------------
    async def _read_loop(self, conn: Connection) -> None:
        # Handled in the socket callback as each message is read: no queue, no task switch.
        conn.dispatch_to(self._handle_guarded)
        await conn.closed.wait()

    def _handle_guarded(self, msg: InboundMessage) -> None:
        try:
            self._handle(msg)
        except Exception:  # a receiver must never die on one message
            log.exception("unexpected error handling a message on %r", msg.topic)
            self._counters.dropped["internal_error"] += 1

    def _handle(self, msg: InboundMessage) -> None:
        self._counters.messages_in += 1
        try:
            parsed = parse_topic(msg.topic)
        except TopicError:
            self._counters.dropped["bad_topic"] += 1
            return
        if parsed.kind == "sync":
            waiter = self._sync_waiters.pop(msg.payload, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            return
        if parsed.kind == "nodes":
            self._handle_presence(parsed, msg)
            return
        if parsed.kind == "checkpoint":
            self._handle_checkpoint(parsed, msg)
            return
        if not msg.payload:
            if not msg.retain:  # a cleared retained message is legitimate; this is not
                self._counters.dropped["malformed"] += 1
            return
        assert self._codec is not None
        try:
            decoded = self._codec.decode(msg.payload, check_replay=not msg.retain)
        except EnvelopeError as exc:
            self._counters.dropped[exc.reason] += 1
            log.debug("dropped message on %s: %s", msg.topic, exc)
            return
        signer = decoded.signer
        # Identity first: our own envelope replayed into another member's subtree is a
        # mismatch to count, not an echo to ignore.
        if parsed.company is not None and parsed.company != signer.member:
            self._counters.dropped["identity_mismatch"] += 1
            return
        if parsed.kind == "state" and parsed.node != signer.node:
            self._counters.dropped["identity_mismatch"] += 1
            return
        if signer == self.identity:
            if self._seeding and parsed.kind == "state" and decoded.message.kind == "state":
                self._keep_state(msg.topic, json.dumps(decoded.message.body,
                                                       separators=(",", ":")).encode(),
                                 only_new=True)
            return  # our own message echoed by a broker without no-local
        kind = decoded.message.kind
        body = decoded.message.body
        if kind == "insights" and parsed.kind in ("insights", "contrib"):
            items = body.get("items") if isinstance(body, dict) else None
            if not isinstance(items, list):
                self._counters.dropped["malformed"] += 1
                return
            now = self._clock()
            for raw in items:
                self._deliver(raw, msg.topic, msg.retain, signer, dedup=True, now=now)
        elif kind == "aggregate" and parsed.kind == "aggregates":
            self._deliver_aggregate(body, msg, signer)
        elif kind == "state" and parsed.kind == "state":
            received = self._deliver(body, msg.topic, msg.retain, signer, dedup=False)
            if received is not None:
                self._states[msg.topic] = received
        else:
            self._counters.dropped["unexpected_kind"] += 1

    def _deliver(self, raw: Any, topic: str, retained: bool, signer: Identity, *,
                 dedup: bool, now: float | None = None) -> ReceivedInsight | None:
        if not isinstance(raw, dict) or not isinstance(raw.get("iid"), str):
            self._counters.dropped["malformed"] += 1
            return None
        iid: str = raw["iid"]
        if dedup and iid in self._seen:
            # Only ids of items that passed validation are remembered, so skipping the
            # validation of a repeat cannot let anything new through.
            self._counters.duplicates += 1
            return None
        try:
            shared = _validate_shared(raw.get("insight"))
        except ValidationError:
            self._counters.dropped["malformed"] += 1
            return None
        sealed = raw.get("sealed")
        received = ReceivedInsight(item_id=iid, topic=topic, member=signer.member,
                                   node=signer.node, insight=shared, retained=retained,
                                   received_at=self._clock() if now is None else now,
                                   sealed=sealed if isinstance(sealed, str) else None)
        if dedup:
            self._seen[iid] = None
            if len(self._seen) > _DEDUP_MEMORY:
                self._seen.popitem(last=False)
            self._counters.insights_in += 1
            self._fan_out(self._insight_streams, received)
            for cb in list(self._callbacks):
                try:
                    cb(received)
                except Exception:
                    log.exception("insight callback %r failed", cb)
        return received

    def _deliver_aggregate(self, body: Any, msg: InboundMessage, signer: Identity) -> None:
        if signer.node != "bridge":
            self._counters.dropped["identity_mismatch"] += 1
            return
        try:
            aggregate = AggregateBody.model_validate(body)
        except ValidationError:
            self._counters.dropped["malformed"] += 1
            return
        received = ReceivedAggregate(topic=msg.topic, aggregate=aggregate, retained=msg.retain,
                                     received_at=self._clock())
        previous = self._aggregates.get(msg.topic)
        self._aggregates[msg.topic] = received
        if previous is not None and previous.aggregate == aggregate:
            self._counters.duplicates += 1  # the same retained aggregate seen again
            return
        self._fan_out(self._aggregate_streams, received)

    def _handle_checkpoint(self, parsed: ParsedTopic, msg: InboundMessage) -> None:
        if not msg.payload:
            return  # a cleared page
        assert self._codec is not None
        try:
            decoded = self._codec.decode(msg.payload, check_replay=False)
        except EnvelopeError as exc:
            self._counters.dropped[exc.reason] += 1
            return
        signer = decoded.signer
        if signer == self.identity:
            return
        if signer.member != parsed.company or signer.node != parsed.node:
            self._counters.dropped["identity_mismatch"] += 1
            return
        body = decoded.message.body
        states = body.get("states") if isinstance(body, dict) else None
        if (decoded.message.kind != "checkpoint" or not isinstance(states, dict)
                or body.get("page") != parsed.page or parsed.company is None):
            self._counters.dropped["malformed"] += 1
            return
        # The topic each state would have on its own: built (and its category checked) by the
        # topic scheme of the signer's member, so a page can only speak for its own node.
        scheme = TopicScheme(parsed.mode, parsed.network or self.config.network_id,
                             parsed.company)
        # A page brings hundreds of acyclic objects at once; without pausing the cyclic
        # collector it would rescan the growing state map many times per page.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            self._load_page(parsed, scheme, signer, states)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _load_page(self, parsed: ParsedTopic, scheme: TopicScheme, signer: Identity,
                   states: dict[str, Any]) -> None:
        for category, raw in states.items():
            try:
                topic = scheme.state(signer.node, category)
            except TopicError:
                self._counters.dropped["bad_topic"] += 1
                continue
            if zlib.crc32(topic.encode()) % CHECKPOINT_PAGES != parsed.page:
                self._counters.dropped["malformed"] += 1  # not a state this page may carry
                continue
            received = self._deliver(raw, topic, True, signer, dedup=False)
            if received is not None:
                self._states[topic] = received
                self._counters.states_from_checkpoints += 1

    def _handle_presence(self, parsed: ParsedTopic, msg: InboundMessage) -> None:
        key = (parsed.company or "", parsed.node or "")
        if not msg.payload:
            self._peers.pop(key, None)
            self._peers_changed.set()
            return
        assert self._codec is not None
        try:
            decoded = self._codec.decode(msg.payload, check_replay=False)
        except EnvelopeError as exc:
            self._counters.dropped[exc.reason] += 1
            return
        signer = decoded.signer
        body = decoded.message.body
        if (parsed.company is not None and parsed.company != signer.member) or (
                parsed.mode != "public" and parsed.node != signer.node):
            self._counters.dropped["identity_mismatch"] += 1
            return
        if not isinstance(body, dict) or not isinstance(body.get("online"), bool):
            self._counters.dropped["malformed"] += 1
            return
        previous = self._peers.get(key)
        ts = decoded.message.timestamp
        raw_session = body.get("session")
        session = raw_session if isinstance(raw_session, str) else ""
        if previous is not None:
            if previous.session == session:
                # The will was signed when the connection opened, before the announcement it
                # ends: within one session "offline" is final whatever the timestamps say.
                if previous.online is False and body["online"]:
                    return
            elif previous.since > ts:
                return  # a presence from an older session delivered late
        self._peers[key] = Peer(member=signer.member, node=signer.node,
                                online=body["online"], since=ts, session=session)
        self._peers_changed.set()

    def insights(self) -> AsyncIterator[ReceivedInsight]:
        """Every verified insight from now on, until ``disconnect()``.

        Each call makes an independent iterator with its own bounded buffer (the oldest are
        dropped and counted as ``subscriber_overflow`` if it falls 100,000 behind).
        """
        return self._iterate(self._insight_streams)

    def aggregates(self) -> AsyncIterator[ReceivedAggregate]:
        """Every verified public aggregate from now on (public mode), until ``disconnect()``.

        Only the bridge may write aggregates (broker ACL); a receiver also checks that the
        signer's certificate is a bridge's (node ``bridge``) before it believes one.
        """
        return self._iterate(self._aggregate_streams)

    def _fan_out(self, streams: list[_Stream[_T]], item: _T) -> None:
        for stream in streams:
            if len(stream.queue) >= _SUBSCRIBER_QUEUE:
                stream.queue.popleft()
                self._counters.dropped["subscriber_overflow"] += 1
            stream.queue.append(item)
            stream.event.set()

    def _iterate(self, streams: list[_Stream[_T]]) -> AsyncIterator[_T]:
        stream: _Stream[_T] = _Stream()
        streams.append(stream)

        async def iterate() -> AsyncIterator[_T]:
            try:
                while True:
                    while stream.queue:
                        yield stream.queue.popleft()
                    if self._supervisor is None:
                        return
                    stream.event.clear()
                    await stream.event.wait()
            finally:
                with contextlib.suppress(ValueError):
                    streams.remove(stream)

        return iterate()

    def on_insight(self, callback: Callable[[ReceivedInsight], Any]) -> Callable[[], None]:
        """Call ``callback`` for each verified insight; returns a function that stops it."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None

    # -- sync, peers, status ------------------------------------------------------------------
    async def sync(self, *, timeout: float = 60.0) -> SyncResult:
        """Collect the current retained state of everything this node may read.

        Subscribes to the state subtree, then publishes a marker on a topic only this node
        uses: the broker sends the retained burst before it routes the later marker, so the
        marker's arrival proves the burst is complete — no waiting on a timer.
        """
        await asyncio.wait_for(self._connected.wait(), timeout)
        conn = self._conn
        if conn is None:
            raise NotConnectedError("not connected")
        t = self._topics
        started = time.perf_counter()
        public = self.config.mode is NetworkMode.PUBLIC
        try:
            async with asyncio.timeout(timeout):
                # Nodes' checkpoint pages carry their states (one signature per page); public
                # mode has no node state, only the bridge's retained aggregates.
                state_filter = t.state_filter() if public else t.checkpoint_filter()
                await conn.subscribe([(state_filter, 1)])
                await self._marker(conn)
                if not public:  # public mode reads state and live aggregates as one
                    await conn.unsubscribe([state_filter])
        except TimeoutError:
            raise TransportError(f"sync did not complete within {timeout} s") from None
        self._last_sync = self._clock()
        return SyncResult(states=dict(self._states), duration=time.perf_counter() - started,
                          aggregates=dict(self._aggregates))

    async def _marker(self, conn: Connection) -> None:
        """Publish a marker to ourselves and wait for it: the retained burst of every earlier
        subscription has then been delivered."""
        nonce = uuid.uuid4().hex.encode()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sync_waiters[nonce] = waiter
        try:
            await conn.publish(self._topics.sync_marker(self.config.node_id), nonce, qos=1)
            await waiter
        finally:
            self._sync_waiters.pop(nonce, None)

    async def wait_connected(self, *, timeout: float) -> None:
        """Wait until the node is connected (again); :class:`TimeoutError` after ``timeout``."""
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def wait_disconnected(self, *, timeout: float) -> None:
        """Wait until the connection is down; :class:`TimeoutError` after ``timeout``."""
        await asyncio.wait_for(self._disconnected.wait(), timeout)

    async def wait_peers(self, predicate: Callable[[list[Peer]], bool], *,
                         timeout: float) -> list[Peer]:
        """Wait until ``predicate(peers())`` holds; returns the peers then."""
        async with asyncio.timeout(timeout):
            while True:
                peers = self.peers()
                if predicate(peers):
                    return peers
                self._peers_changed.clear()
                await self._peers_changed.wait()

    def peers(self) -> list[Peer]:
        """Other nodes whose retained presence says they are online."""
        me = (self.identity.member, self.identity.node) if self._codec else None
        return [p for k, p in self._peers.items() if p.online and k != me]

    def status(self) -> NetworkStatus:
        """Connection state, counters and health right now."""
        c = self._counters
        depth = self._outbox.depth if self._outbox is not None else 0
        connected = self._connected.is_set()
        dropped = dict(c.dropped)
        if connected:
            health = Health.OK if depth < 10_000 else Health.DEGRADED
        else:
            health = Health.DEGRADED if self._supervisor is not None else Health.DOWN
        return NetworkStatus(
            connected=connected, broker=self.config.broker_url, peers=len(self.peers()),
            last_sync=(None if self._last_sync is None else
                       datetime.fromtimestamp(self._last_sync, UTC)),
            messages_in=c.messages_in, messages_out=c.messages_out, dropped=dropped,
            duplicates=c.duplicates, states_from_checkpoints=c.states_from_checkpoints,
            latency_ms=None if self._latency is None else round(self._latency, 3),
            outbox_depth=depth, reconnects=c.reconnects, health=health,
            connected_since=(datetime.fromtimestamp(self._connected_since, UTC)
                             if connected and self._connected_since is not None else None),
            last_error=self._last_error)

    @property
    def pseudonymizer(self) -> Pseudonymizer | None:
        return Pseudonymizer.from_config(self.config)


# SharedInsight.model_validate without the wrapper's own per-call cost (once per item).
_validate_shared = SharedInsight.__pydantic_validator__.validate_python


class _Window:
    """Flow control for unacknowledged publishes: at most ``count`` of them and ``nbytes``
    bytes (one publish larger than that still goes, alone)."""

    __slots__ = ("_bytes", "_count", "_freed", "_limit_bytes", "_limit_count")

    def __init__(self, *, count: int, nbytes: int) -> None:
        self._limit_count, self._limit_bytes = count, nbytes
        self._count = self._bytes = 0
        self._freed = asyncio.Event()

    async def acquire(self, nbytes: int) -> None:
        while self._count and (self._count >= self._limit_count
                               or self._bytes + nbytes > self._limit_bytes):
            self._freed.clear()
            await self._freed.wait()
        self._count += 1
        self._bytes += nbytes

    def release(self, nbytes: int) -> None:
        self._count -= 1
        self._bytes -= nbytes
        self._freed.set()


def _batches(rows: list[OutboxItem], limit: int) -> Iterator[list[OutboxItem]]:
    """Group a page of rows by (topic, kind), in order, at most ``limit`` per batch.

    Order is kept per topic, which is all MQTT promises anyway. A state row is its own batch:
    each retained state is one message. Live insights go first and states after them: a
    reader waits for the insight, while the retained state only has to be there eventually
    (signing it first would add its cost to every insight's latency).
    """
    groups: dict[tuple[str, str], list[OutboxItem]] = {}
    states: list[OutboxItem] = []
    for row in rows:
        if row.kind == "state":
            states.append(row)
            continue
        key = (row.topic, row.kind)
        batch = groups.setdefault(key, [])
        batch.append(row)
        if len(batch) >= limit:
            yield batch
            groups[key] = []
    for batch in groups.values():
        if batch:
            yield batch
    for row in states:
        yield [row]


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def _b64d(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        return None
