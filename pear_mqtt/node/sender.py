"""A node's sending side: ``broadcast_market_insight`` into the outbox, and the flusher that
signs pending items into envelopes, publishes them at QoS 1 and deletes them on PUBACK.

The flusher batches only while the caller works through a backlog. A state goes into the
checkpoint pages (:mod:`.checkpoints`); with per-category state topics it is also held back
while a burst lasts (only the newest is signed) and published retained. Pacing contract:
docs/DESIGN.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Sequence

from ..config.models import NetworkConfig
from ..errors import (
    NotConnectedError,
    OutboxError,
    OversizedMessage,
    PublishRefused,
    TransportError,
)
from ..model.insight import MarketInsight, NetworkMode
from ..model.topics import CHECKPOINT_PAGES, TopicScheme
from ..privacy.filter import PrivacyFilter
from ..security.envelope import EnvelopeCodec
from ..security.seal import Sealer
from ..transport import Connection
from .checkpoints import CheckpointPages
from .counters import Counters
from .heldstates import HeldStates
from .history import NodeLog
from .item_ids import ItemIds
from .markers import Markers
from .memory_outbox import MemoryOutbox
from .outbox import Outbox, OutboxItem
from .producer import Producer
from .suspects import Suspects
from .window import Window

__all__ = ["BACKGROUND_PER_ROUND", "MIDSTREAM_BUDGET", "STATE_MAX_DEFER", "STATE_QUIET",
           "Sender"]

log = logging.getLogger(__name__)

STATE_MAX_DEFER = 1.0
"""Seconds a retained state may be held back while insights keep coming."""
STATE_QUIET = 0.02
"""Seconds without a broadcast that end a burst (held-back states all go then)."""
BACKGROUND_PER_ROUND = 4
"""Retained states (and pages) sent per flusher round, so that a live insight never waits
behind a whole batch of them (each costs a signature)."""
MIDSTREAM_BUDGET = 0.0003
"""Seconds of a round that overdue states may take while insights flow."""

_BURST_END_BUDGET = 0.002  # s of signing held-back states between two looks for new insights
_BURST_END_BATCH = 256
_MAX_INFLIGHT_ENVELOPES = 256
# Bytes of unacknowledged envelopes (each also copied into paho's packet): a batch can be a few
# hundred kB, and a full count window of them would hold tens of MB for no gain in speed (on
# loopback half a MB in flight keeps the broker busy; the agent's RSS target is 60 MB).
_MAX_INFLIGHT_BYTES = 512 * 1024
# broadcast_market_insight never has to wait, so a caller broadcasting in a tight loop would
# hold the event loop until it is done: nothing sent, no acks read, no keep-alives. It hands
# the loop over when this much time (s) has passed since it last did, so sending overlaps
# the caller's own work.
_BROADCAST_YIELD_INTERVAL = 0.001
# A broadcast starting this soon (s) after the previous one returned is "back to back": the
# caller is working through a backlog, and the flusher batches (see Sender._linger).
_BACK_TO_BACK = 0.0002
# ... and this many of them since the flusher went idle start a batch: a paced sender that
# catches up after a stall makes one or two, a loop over a backlog dozens.
_BUSY_BACK_TO_BACK = 3
_MAX_LINGER_FACTOR = 10
_WAKE_MAX = 5.0  # longest wait (s) before a deferred page or held state is considered again


class Sender:
    """The outbox, the flusher task over it (:meth:`run`, one per connection) and the
    checkpoint pages it keeps (:attr:`pages`)."""

    def __init__(self, *, config: NetworkConfig, counters: Counters,
                 privacy: PrivacyFilter) -> None:
        self.config = config
        self._counters = counters
        self._producer = Producer(config=config, counters=counters, privacy=privacy)
        self._codec: EnvelopeCodec | None = None
        self._scheme: TopicScheme | None = None
        self._history: NodeLog | None = None
        self._outbox: Outbox | MemoryOutbox | None = None
        self._work = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._timer: asyncio.TimerHandle | None = None
        self._inflight_ids: set[int] = set()
        self._suspects = Suspects()  # rows in flight when a connection closed
        self._acks: list[int] = []  # acknowledged rows not yet deleted (see _ack_rows)
        self._refused_topics: set[str] = set()  # said once each (see _publish)
        self._ack_scheduled = False
        self._send_cursor = 0
        self._latency: float | None = None
        self._yielded_at = self._broadcast_at = time.monotonic()
        self._back_to_back = 0  # broadcasts that started right after the previous one returned
        self._held = HeldStates()  # state rows held back while a burst lasts
        # Without per-category state topics a state row is done once a page carries it.
        self._state_topics = config.reliability.state_topics
        # The rows waiting for their pages stay within a quarter of the outbox's bound (state
        # rows are never dropped for space: beyond it new insights would be refused).
        waiting = (None if self._state_topics
                   else config.reliability.outbox_max_bytes // (4 * CHECKPOINT_PAGES))
        self._pages = CheckpointPages(node_id=config.node_id, counters=counters,
                                      seeded=config.mode is NetworkMode.PUBLIC,
                                      wake=self._work.set, wake_later=self._wake_later,
                                      settled=self._maybe_idle, ack=self._ack_rows,
                                      state_topics=self._state_topics, max_waiting=waiting)
        self._send_pages = self._pages.send
        self._keep_state = self._pages.keep_state

    def attach(self, *, codec: EnvelopeCodec, topics: TopicScheme, sealer: Sealer | None,
               outbox: Outbox | MemoryOutbox, markers: Markers,
               history: NodeLog | None = None) -> None:
        """What ``connect()`` opened: sign with ``codec``, seal aggregated groups with
        ``sealer``, send from ``outbox``, and log every envelope in ``history``."""
        self._codec, self._scheme, self._outbox = codec, topics, outbox
        self._history = history
        self._producer.attach(topics=topics, sealer=sealer, item_ids=ItemIds(codec.signer),
                              outbox=outbox)
        self._pages.attach(codec=codec, topics=topics, markers=markers)
        if outbox.depth > 0:
            self._idle.clear()  # rows left by an earlier run still wait for their acks

    def close_outbox(self) -> None:
        if self._outbox is not None:
            self._flush_acks()
            self._outbox.close()
            self._outbox = None

    @property
    def pages(self) -> CheckpointPages:
        return self._pages

    @property
    def outbox_depth(self) -> int:
        return self._outbox.depth if self._outbox is not None else 0

    def outbox_oldest(self) -> float | None:
        """When the oldest insight or state still waiting was stored (None: nothing waits)."""
        return self._outbox.oldest() if self._outbox is not None else None

    @property
    def latency(self) -> float | None:
        """Smoothed PUBACK round trip in ms (None before the first)."""
        return self._latency

    @property
    def idle(self) -> bool:
        """Everything broadcast so far (and every page) is acknowledged."""
        return self._idle.is_set()

    @property
    def held_states(self) -> int:
        """Retained states held back until the burst ends (or they are overdue)."""
        return len(self._held)

    @property
    def last_broadcast(self) -> float:
        """``time.monotonic()`` when the latest broadcast returned."""
        return self._broadcast_at

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def wake(self) -> None:
        """Look for work now (a new connection, a flush)."""
        self._work.set()

    def force(self) -> None:
        """Send everything now: held-back states and changed pages included."""
        self._pages.forced = True
        self._work.set()

    def connection_lost(self) -> None:
        """Forget what was in flight: it is still in the outbox and is fetched again."""
        self._inflight_ids.clear()
        self._send_cursor = 0
        self._held.clear()

    # -- broadcasting --------------------------------------------------------------------------
    async def broadcast(self, insight: MarketInsight) -> str:
        """Filter ``insight``, store it (and its state) in the outbox; returns its item id
        (see :meth:`Producer.prepare`: the same observation broadcast again keeps its id)."""
        self._require_attached()
        if time.monotonic() - self._broadcast_at < _BACK_TO_BACK:
            self._back_to_back += 1  # the caller produces insights as fast as it can
        item_id, item = self._producer.prepare(insight)
        if item is not None:
            self._producer.store([item])
        return await self._broadcasted(1 if item is not None else 0, item_id)

    async def broadcast_many(self, insights: Sequence[MarketInsight]) -> list[str]:
        """:meth:`broadcast` for a batch: every insight is filtered first, then all are
        stored in one outbox transaction; returns their item ids in order.

        All or nothing: when one insight is refused (the error names its position) or the
        outbox refuses the batch, none of them is stored.
        """
        self._require_attached()
        ids, items = self._producer.prepare_many(insights)
        if items:
            # A batch is a backlog by definition: the flusher may linger and batch it.
            self._back_to_back += len(items)
            self._producer.store(items)
        await self._broadcasted(len(items), ids[-1] if ids else "")
        return ids

    def _require_attached(self) -> None:
        if not self._producer.attached:
            raise NotConnectedError("call connect() before broadcasting")

    async def _broadcasted(self, stored: int, item_id: str) -> str:
        """Count ``stored`` items, wake the flusher and hand the loop over now and then."""
        if stored:
            self._counters.insights_out += stored
            self._idle.clear()
            self._work.set()
        now = self._broadcast_at = time.monotonic()
        if now - self._yielded_at >= _BROADCAST_YIELD_INTERVAL:
            self._yielded_at = now
            await asyncio.sleep(0)
        return item_id

    # -- the flusher ---------------------------------------------------------------------------
    async def run(self, conn: Connection) -> None:
        """Send from the outbox over ``conn`` until it closes."""
        assert self._outbox is not None and self._codec is not None
        window = Window(count=_MAX_INFLIGHT_ENVELOPES, nbytes=_MAX_INFLIGHT_BYTES)
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
                    if self._held and not self._pages.forced:
                        now = time.monotonic()
                        quiet = now - self._broadcast_at
                        if quiet < STATE_QUIET:
                            if self._held.held_for(now) < STATE_MAX_DEFER:
                                # Insights are still coming: hold the states a little longer.
                                self._wake_later(STATE_QUIET - quiet)
                                break
                            # Overdue while insights still come: small slices with the loop
                            # handed over between them, so a paced stream's next insight
                            # never waits behind milliseconds of signing.
                            ended = False
                    if not (await self.send_states(
                                conn, window,
                                limit=_BURST_END_BATCH if ended else BACKGROUND_PER_ROUND,
                                budget=_BURST_END_BUDGET if ended else MIDSTREAM_BUDGET)
                            and await self._send_pages(conn, window, burst_end=ended,
                                                       limit=BACKGROUND_PER_ROUND)):
                        return
                    if self._held or self._pages.cut:
                        # One slice at a time: a new insight goes out ahead of the rest.
                        await asyncio.sleep(0)
                        continue
                    if not self._send_head(conn, forced=self._pages.forced):
                        return
                    self._maybe_idle()
                    break
                self._send_cursor = rows[-1].id
                live = []
                # Live row id -> its state row, when the live envelope may serve as the
                # retained state too (see _send_batch): while the caller works through a
                # backlog (counted now, not only when the flusher woke: a batch may have
                # come while it was busy). A paced stream's states are held back instead.
                backlog = busy or self._back_to_back - idle_b2b >= _BUSY_BACK_TO_BACK
                shared: dict[int, OutboxItem] = {}
                prev: OutboxItem | None = None
                for row in rows:
                    if row.kind != "state":
                        live.append(row)
                        prev = row
                        continue
                    if not self._state_topics:
                        # Its page is its retained form: the row goes once that is acked.
                        self._keep_state(row.topic, row.payload, row=row.id)
                        continue
                    if (backlog and prev is not None and prev.id == row.id - 1
                            and prev.payload == row.payload):
                        shared[prev.id] = row
                    # A newer state of the same category replaces the held one in the outbox
                    # too, so only the newest is ever signed and sent.
                    self._held.hold(row)
                for batch in _batches(live, rel.batch_max_items):
                    if not await self._send_batch(conn, window, batch, shared=shared):
                        return
                # Mid-stream, what is overdue goes a little per round (about a third of a
                # millisecond of signing), so the live insights between never stall.
                if (self._held.overdue(time.monotonic(), STATE_MAX_DEFER)
                        and not await self.send_states(conn, window,
                                                       limit=BACKGROUND_PER_ROUND,
                                                       budget=MIDSTREAM_BUDGET)):
                    return
                if not await self._send_pages(conn, window, burst_end=False, limit=1):
                    return
                if not self._send_head(conn, forced=False):
                    return

    def _send_head(self, conn: Connection, *, forced: bool) -> bool:
        """Publish the history log's signed head when it is due; False if the connection
        broke."""
        history = self._history
        wait = None if history is None else history.head_wait(forced=forced)
        if wait is None:
            return True
        if wait > 0:
            self._wake_later(wait)  # the head follows a burst within HEAD_INTERVAL
            return True
        assert history is not None
        try:
            history.publish_head(conn, pages=self._pages.logged)
        except TransportError as exc:
            log.info("publish stopped: %s", exc)
            return False
        return True

    async def _send_batch(self, conn: Connection, window: Window, batch: list[OutboxItem],
                          *, shared: dict[int, OutboxItem] | None = None) -> bool:
        """Sign and publish ``batch``; False if the connection broke.

        ``shared`` maps a live row to its held-back state row: when that row's envelope
        carries it alone, the same signed bytes are published as the retained state too
        (one signature for both), unless a newer state of the category is held by now.
        """
        if self._suspects:
            batch = await self._send_suspects(conn, window, batch)
            if not batch:
                return not conn.closed.is_set()
        for payload, ids in self._encode(batch):
            rows = [(batch[0], ids)]
            state = shared.get(ids[0]) if shared and len(ids) == 1 else None
            if state is not None and self._held.take_shared(state, STATE_MAX_DEFER):
                self._keep_state(state.topic, state.payload)
                rows.append((state, [state.id]))
            for first, row_ids in rows:
                await window.acquire(len(payload))
                try:
                    self._publish(conn, first, payload, row_ids, window)
                except TransportError as exc:  # includes NotConnectedError
                    window.release(len(payload))
                    log.info("publish stopped: %s", exc)
                    return False
        return True

    async def _send_suspects(self, conn: Connection, window: Window,
                             batch: list[OutboxItem]) -> list[OutboxItem]:
        """Dead-letter the rows of ``batch`` the broker refused by closing the connection,
        send those suspected of it alone (each PUBACK awaited); return the rest."""
        rest: list[OutboxItem] = []
        for row in batch:
            if self._suspects.refused(row.id):
                self._dead_letter(row.topic, "connection closed", [row.id])
            elif not self._suspects.alone(row.id):
                rest.append(row)
            else:
                for payload, ids in self._encode([row]):
                    await window.acquire(len(payload))
                    try:
                        sent = self._publish(conn, row, payload, ids, window)
                    except TransportError:
                        window.release(len(payload))
                        return []
                    await _settled_or_closed(sent, conn)
                    if conn.closed.is_set():
                        return []
        return rest

    async def send_states(self, conn: Connection, window: Window, *, limit: int,
                          budget: float | None = None) -> bool:
        """Send up to ``limit`` held-back retained states, one message each (oldest change
        first), and no more once ``budget`` seconds went into it; False if the connection
        broke.

        During a burst a category's state changes with every insight; it only has to reach
        the broker eventually (the live insight already went out), so it waits for the burst
        to end, or :data:`STATE_MAX_DEFER` at most, and one signature covers many updates.
        """
        started = time.monotonic()
        for _ in range(limit):
            if not self._held or (
                    budget is not None and time.monotonic() - started > budget):
                break
            row = self._held.pop_oldest()
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
                and self._pages.settled):
            self._pages.forced = False  # flush() is satisfied
            self._idle.set()

    def _wake_later(self, delay: float) -> None:
        if self._timer is None or self._timer.cancelled():
            def wake() -> None:
                self._timer = None
                self._work.set()
            self._timer = asyncio.get_running_loop().call_later(
                min(max(delay, 0.05), _WAKE_MAX), wake)

    def _encode(self, batch: list[OutboxItem]) -> list[tuple[bytes, list[int]]]:
        """Sign ``batch`` as one envelope, or as several when it is over the size limit."""
        assert self._codec is not None
        try:
            # Rows hold each item's JSON as the outbox stored it: join, don't re-serialise.
            # The live stream is the log; a retained state repeats one of its items.
            history = self._history if batch[0].kind != "state" else None
            ref = history.next_ref() if history is not None else None
            if batch[0].kind == "state":
                payload = self._codec.encode_json(kind="state", body_json=batch[-1].payload)
                self._keep_state(batch[-1].topic, batch[-1].payload)
            else:
                payload = self._codec.encode_json(
                    kind="insights",
                    body_json=b'{"items":[' + b",".join(r.payload for r in batch) + b"]}",
                    log_ref=ref)
            if history is not None:
                history.append(batch[0].topic, payload)
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
                 window: Window) -> asyncio.Future[None]:
        rel = self.config.reliability
        fut = conn.publish(first.topic, payload, qos=rel.qos, retain=first.retain,
                           expiry=rel.message_expiry if first.retain else None)
        self._inflight_ids.update(ids)
        self._counters.messages_out += 1
        sent_at = time.perf_counter()

        nbytes = len(payload)
        live = first.kind != "state"  # one row per insight (or sealed part)

        def done(f: asyncio.Future[None]) -> None:
            window.release(nbytes)
            self._inflight_ids.difference_update(ids)
            exc = None if f.cancelled() else f.exception()
            if isinstance(exc, PublishRefused):
                self._dead_letter(first.topic, exc.reason, ids)
                return
            if f.cancelled() or exc is not None:
                # The connection went with it unacknowledged: the rows stay in the outbox
                # and are sent again after reconnecting, alone if this keeps happening.
                self._suspects.closed(ids)
                return
            rtt = (time.perf_counter() - sent_at) * 1000
            self._latency = rtt if self._latency is None else 0.9 * self._latency + 0.1 * rtt
            if live:
                self._counters.insights_acked += len(ids)
            self._suspects.acked(ids)
            self._ack_rows(ids)

        fut.add_done_callback(done)
        return fut

    def _dead_letter(self, topic: str, reason: str, ids: list[int]) -> None:
        """The broker's rules refuse these rows: sending them again cannot help. Dropped from
        the outbox, counted by the reason and said once per topic, never retried forever."""
        why = "_".join(reason.lower().split())
        self._counters.dropped[f"refused_{why}"] += len(ids)
        if topic not in self._refused_topics:
            self._refused_topics.add(topic)
            log.warning("broker refused a publish on %s (%s): %d item(s) dropped from the "
                        "outbox; check this node's identity and the broker's ACL", topic,
                        reason, len(ids))
        self._ack_rows(ids)

    def _ack_rows(self, ids: list[int]) -> None:
        # The PUBACKs one read of the socket brings are deleted in one outbox transaction:
        # their callbacks all run before the flush scheduled by the first of them.
        self._acks.extend(ids)
        if not self._ack_scheduled:
            self._ack_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        self._ack_scheduled = False
        ids, self._acks = self._acks, []
        if self._outbox is None or not ids:
            return
        try:
            self._outbox.ack(ids)
        except OutboxError as exc:
            # The rows stay and are sent again: receivers de-duplicate by item id.
            log.error("outbox could not record acknowledgements: %s", exc)
            self._counters.dropped["outbox_ack_failed"] += 1
            return
        self._maybe_idle()


async def _settled_or_closed(sent: asyncio.Future[None], conn: Connection) -> None:
    """Until ``sent`` has its PUBACK (or failed), or ``conn`` closed."""
    async def settled() -> None:
        with contextlib.suppress(Exception):
            await asyncio.shield(sent)

    async def closed() -> None:
        await conn.closed.wait()

    waiting = [asyncio.ensure_future(settled()), asyncio.ensure_future(closed())]
    try:
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waiting:
            task.cancel()


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
