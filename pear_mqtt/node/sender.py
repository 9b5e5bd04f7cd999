"""A node's sending side: ``broadcast_market_insight`` into the outbox, and the flusher that
paces pending items into batches for :mod:`.delivery` (which signs, publishes and settles
them).

The flusher batches only while the caller works through a backlog. A state goes into the
checkpoint pages (:mod:`.checkpoints`); with per-category state topics it is also held back
while a burst lasts (only the newest is signed) and published retained. Pacing contract:
docs/DESIGN.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from ..config.models import NetworkConfig
from ..errors import NotConnectedError, TransportError
from ..model.insight import MarketInsight, NetworkMode
from ..model.topics import CHECKPOINT_PAGES, TopicScheme
from ..privacy.filter import PrivacyFilter
from ..security.envelope import EnvelopeCodec
from ..security.seal import Sealer
from ..transport import Connection
from .checkpoints import CheckpointPages
from .counters import Counters
from .delivery import Delivery, batches
from .heldstates import HeldStates
from .history import NodeLog
from .markers import Markers
from .memory_outbox import MemoryOutbox
from .outbox import Outbox, OutboxItem
from .producer import PreparedBatch, Producer
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
# Back-pressure: a broadcast waits while the state rows waiting for their pages fill more
# than this share of the outbox's bound (they are never dropped for space, so without it a
# producer faster than the pages would fill the outbox until it refuses insights) ...
_STATE_ROOM = 0.5
# ... while the node is connected (offline no page can relieve them), at most this long (s).
_ROOM_WAIT = 30.0
_WAKE_MAX = 5.0  # longest wait (s) before a deferred page or held state is considered again


class Sender:
    """The outbox, the flusher task over it (:meth:`run`, one per connection) that hands
    batches to its :class:`~.delivery.Delivery`, and the checkpoint pages it keeps
    (:attr:`pages`)."""

    def __init__(self, *, config: NetworkConfig, counters: Counters,
                 privacy: PrivacyFilter) -> None:
        self.config = config
        self._counters = counters
        self._producer = Producer(config=config, counters=counters, privacy=privacy)
        self._history: NodeLog | None = None
        self._outbox: Outbox | MemoryOutbox | None = None
        self._work = asyncio.Event()
        self._idle = asyncio.Event()
        self._room = asyncio.Event()  # rows were acknowledged: room in the outbox
        self._online = False  # run() is sending over a connection
        self._idle.set()
        self._timer: asyncio.TimerHandle | None = None
        self._send_cursor = 0
        self._yielded_at = self._broadcast_at = time.monotonic()
        self._back_to_back = 0  # broadcasts that started right after the previous one returned
        self._back_to_back_at = 0.0  # when the last of them started
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
        self._delivery = Delivery(config=config, counters=counters, keep_state=self._keep_state,
                                  share=self._share, settled=self._maybe_idle)
        self._send_batch = self._delivery.send_batch

    def attach(self, *, codec: EnvelopeCodec, topics: TopicScheme, sealer: Sealer | None,
               outbox: Outbox | MemoryOutbox, markers: Markers,
               history: NodeLog | None = None) -> None:
        """What ``connect()`` opened: sign with ``codec``, seal aggregated groups with
        ``sealer``, send from ``outbox``, and log every envelope in ``history``."""
        self._outbox, self._history = outbox, history
        self._delivery.attach(codec=codec, outbox=outbox, history=history,
                              mixed_topic=topics.mixed_insights())
        self._producer.attach(topics=topics, sealer=sealer, signer=codec.signer, outbox=outbox)
        self._pages.attach(codec=codec, topics=topics, markers=markers)
        if outbox.depth > 0:
            self._idle.clear()  # rows left by an earlier run still wait for their acks

    def close_outbox(self) -> None:
        if self._outbox is not None:
            self._delivery.detach()
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
        return self._delivery.latency

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
        self._delivery.connection_lost()
        self._send_cursor = 0
        self._held.clear()

    # -- broadcasting --------------------------------------------------------------------------
    async def broadcast(self, insight: MarketInsight) -> str:
        """Filter ``insight``, store it (and its state) in the outbox; returns its item id
        (see :meth:`Producer.prepare`: the same observation broadcast again keeps its id)."""
        self._require_attached()
        now = time.monotonic()
        if now - self._broadcast_at < _BACK_TO_BACK:
            self._back_to_back += 1  # the caller produces insights as fast as it can
            self._back_to_back_at = now
        item_id, item = self._producer.prepare(insight)
        if item is not None:
            await self._room_for_states()
            self._producer.store([item])
        return await self._broadcasted(1 if item is not None else 0, item_id)

    async def broadcast_many(self, insights: Sequence[MarketInsight]) -> list[str]:
        """:meth:`broadcast` for a batch: every insight is filtered first, then all are
        stored in one outbox transaction; returns their item ids in order.

        All or nothing: when one insight is refused (the error names its position) or the
        outbox refuses the batch, none of them is stored.
        """
        self._require_attached()
        return await self.broadcast_prepared(self._producer.prepare_many(insights))

    async def broadcast_prepared(self, batch: PreparedBatch) -> list[str]:
        """Store a batch a :class:`~.producer.Preparer` of this node made (here or in another
        process) in one outbox transaction; returns its item ids."""
        self._require_attached()
        self._producer.accept(batch)
        ids, items = batch.ids, batch.items
        if items:
            # A batch is a backlog by definition: the flusher may linger and batch it.
            self._back_to_back += len(items)
            self._back_to_back_at = time.monotonic()
            await self._room_for_states()
            self._producer.store(items)
        await self._broadcasted(len(items), ids[-1] if ids else "")
        return ids

    async def _room_for_states(self) -> None:
        """Wait while the state rows waiting for their pages fill more than
        :data:`_STATE_ROOM` of the outbox's bound and the pages that carry them can go out
        (connected; :data:`_ROOM_WAIT` s at most): back-pressure on a producer that outruns
        them. Then the put goes ahead (refused if the outbox is full)."""
        outbox = self._outbox
        if not isinstance(outbox, Outbox) or self._state_topics:
            return
        limit = outbox.max_bytes * _STATE_ROOM
        deadline = time.monotonic() + _ROOM_WAIT
        while outbox.state_bytes > limit and self._online:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._room.clear()
            self._work.set()
            try:
                await asyncio.wait_for(self._room.wait(), left)
            except TimeoutError:
                return

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
        self._online = True
        try:
            await self._run(conn)
        finally:
            self._online = False
            self._room.set()  # broadcasts waiting for room go ahead (or are refused)

    async def _run(self, conn: Connection) -> None:
        assert self._outbox is not None
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
                    now = time.monotonic()
                    quiet = now - self._broadcast_at
                    if (not self._held and not self._pages.forced
                            and now - self._back_to_back_at < STATE_QUIET):
                        # Caught up with a caller still working through a backlog: not the
                        # end of it. Pages go when due (each refresh re-signs a whole page)
                        # and all of them once the caller pauses or flushes.
                        ended = False
                        self._wake_later(self._back_to_back_at + STATE_QUIET - now)
                    if self._held and not self._pages.forced and quiet < STATE_QUIET:
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
                    if not await self._send_head(conn, forced=self._pages.forced):
                        return
                    self._maybe_idle()
                    break
                self._send_cursor = rows[-1].id
                live = []
                # Live row id -> its state row, when the live envelope may serve as the
                # retained state too (see Delivery.send_batch): while the caller works
                # through a backlog (counted now, not only when the flusher woke: a batch may
                # have come while it was busy). A paced stream's states are held back instead.
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
                for batch in batches(live, rel.batch_max_items,
                                     prefix=self._delivery.category_prefix, alone=shared):
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
                if not await self._send_head(conn, forced=False):
                    return

    async def _send_head(self, conn: Connection, *, forced: bool) -> bool:
        """Publish the history log's signed head when it is due; False if the connection
        broke."""
        history = self._history
        if history is None or not self._pages.seeded:
            # A head names the node's pages: one sent before they were read back would
            # leave out those an earlier run sent, and joiners would drop them.
            return True
        wait = history.head_wait(forced=forced, slots=self._pages.slots)
        if wait is None:
            return True
        if wait > 0:
            self._wake_later(wait)  # the head follows a burst within HEAD_INTERVAL
            return True
        try:
            await history.publish_head(conn, pages=self._pages.logged,
                                       slots=self._pages.slots)
        except TransportError as exc:
            log.info("publish stopped: %s", exc)
            return False
        return True

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

    def _share(self, state: OutboxItem) -> bool:
        """Whether ``state`` may go on its live envelope (see :meth:`Delivery.send_batch`)."""
        return self._held.take_shared(state, STATE_MAX_DEFER)

    def _ack_rows(self, ids: list[int]) -> None:
        # The pages' hook: they exist before the delivery (it keeps states in them).
        self._delivery.ack_rows(ids)
        self._room.set()

    def _maybe_idle(self) -> None:
        if (self._outbox is not None and not self._delivery.in_flight
                and self._outbox.depth == 0 and self._pages.settled):
            self._pages.forced = False  # flush() is satisfied
            self._idle.set()

    def _wake_later(self, delay: float) -> None:
        if self._timer is None or self._timer.cancelled():
            def wake() -> None:
                self._timer = None
                self._work.set()
            self._timer = asyncio.get_running_loop().call_later(
                min(max(delay, 0.05), _WAKE_MAX), wake)
