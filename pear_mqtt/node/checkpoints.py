"""A node's state checkpoint pages: its current retained states, paged, signed and retained
so that a late joiner reads a few pages instead of thousands of states (docs/DESIGN.md); a
page over one message goes in parts. Without per-category state topics a state's outbox row
waits here until the page part carrying it is acknowledged."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import zlib
from collections.abc import Callable

from ..errors import TransportError
from ..model.topics import CHECKPOINT_PAGES, TopicScheme, checkpoint_slot
from ..security.envelope import EnvelopeCodec
from ..transport import Connection
from .counters import Counters
from .markers import Markers
from .pageparts import PageCutter, SignedPart
from .window import Window

__all__ = ["CheckpointPages"]

log = logging.getLogger(__name__)

# Refreshes are paced so that they cost about as much as the state traffic itself, whatever
# the update pattern: while states stream, a page is re-sent once the bytes changed in it
# reach its size (so it at most doubles each time); when a burst ends, the changed pages go
# out as a byte budget allows (the state bytes sent plus a trickle); flush() and
# disconnect() send whatever is pending at once.
_PAGE_BUDGET_TRICKLE = 64 * 1024  # page bytes per second allowed on top of the state bytes
_PAGE_BUDGET_CAP = 64 * 1024 * 1024
_PAGE_MIN_GROWTH = 16 * 1024  # changed bytes that justify a refresh mid-stream
_SEED_ROUNDS = 20  # marker round trips at most, while each still brings own states back
_PAGE_MIN_INTERVAL = 1.0  # s between two refreshes of one page when a burst ends


class CheckpointPages:
    """The pages of one node: page -> {state topic: ``"<category>":<item JSON>``}.

    Pages are sent only once :attr:`seeded` (the node's earlier states were read back, so a
    page never replaces a fuller one on the broker). The flusher sends them
    (:meth:`send`); ``wake``, ``wake_later`` and ``settled`` are its hooks: look for work
    now, look again after a delay, and check whether everything is acknowledged; ``ack``
    takes the outbox rows of the states a page carried once the broker acknowledged it.
    ``state_topics``: the node also keeps per-category state topics, which it reads back
    before its pages when it starts (they may be newer than the pages). ``max_waiting``:
    bytes of outbox rows one page may keep waiting before it is due mid-stream (None: no
    bound), so that they stay well within the outbox's bound.
    """

    def __init__(self, *, node_id: str, counters: Counters, seeded: bool,
                 wake: Callable[[], None], wake_later: Callable[[float], None],
                 settled: Callable[[], None], ack: Callable[[list[int]], None],
                 state_topics: bool, max_waiting: int | None = None) -> None:
        self._node_id = node_id
        self._counters = counters
        self._wake, self._wake_later, self._settled = wake, wake_later, settled
        self._ack = ack
        self._state_topics = state_topics
        self._max_waiting = max_waiting
        self._codec: EnvelopeCodec | None = None
        self._topics: TopicScheme | None = None
        self._markers: Markers | None = None
        self.logged: dict[int, int] = {}
        """Page part (:func:`checkpoint_slot`) -> envelope sequence number of its latest
        version (what this node's signed heads name, so that sync() knows when it holds them
        all)."""
        self._pages: list[dict[str, bytes]] = [{} for _ in range(CHECKPOINT_PAGES)]
        self._cutter = PageCutter(node_id=node_id)
        # Part topics of each page that may hold a retained message (those past the parts
        # of the page as last sent are cleared with it).
        self._on_broker = [0] * CHECKPOINT_PAGES
        # Outbox rows (id -> (bytes, state topic)) of states in a page not yet acknowledged
        # with the part carrying them.
        self._rows: list[dict[int, tuple[int, str]]] = [{} for _ in range(CHECKPOINT_PAGES)]
        self._waiting = [0] * CHECKPOINT_PAGES  # their bytes
        self._dirty: dict[int, None] = {}  # insertion order: oldest change first
        # Dirty pages whose changes justify a refresh mid-stream, so that a flusher round
        # does not scan every dirty page to find the few that are due.
        self._due: dict[int, None] = {}
        self._changed = [0] * CHECKPOINT_PAGES  # bytes changed since the page was sent
        self._sent = [0] * CHECKPOINT_PAGES  # size of the page when last sent
        self._sent_at = [0.0] * CHECKPOINT_PAGES  # monotonic time it was last sent
        self._budget = 0.0
        self._budget_at = time.monotonic()
        self._inflight = 0
        self._seeded = seeded
        self._seeding = False
        # While seeding: state topic -> sequence of the own part it was read back from (a
        # part left over from an earlier, larger version is older than the current one).
        self._seed_sequence: dict[str, int] = {}
        self.forced = False
        """A flush is under way: every changed page (and held-back state) goes now."""
        self.cut = False
        """The last :meth:`send` stopped at its limit with more pages due."""

    def attach(self, *, codec: EnvelopeCodec, topics: TopicScheme, markers: Markers) -> None:
        """Sign with ``codec``, name topics with ``topics`` (set on each ``connect()``)."""
        self._codec, self._topics, self._markers = codec, topics, markers
        self._cutter.attach(codec)

    @property
    def seeded(self) -> bool:
        return self._seeded

    @property
    def seeding(self) -> bool:
        """The node's own retained states are being read back (see :meth:`seed`)."""
        return self._seeding

    @property
    def settled(self) -> bool:
        """No page is changed or waiting for its acknowledgement."""
        return not self._dirty and not self._inflight

    async def send(self, conn: Connection, window: Window, *,
                   burst_end: bool, limit: int) -> bool:
        """Send the changed pages the pacing allows (all of them while :attr:`forced`),
        ``limit`` messages at most, a page always whole (:attr:`cut` tells whether more were
        due); False if the connection broke."""
        self.cut = False
        if not self._dirty or not self._seeded:
            return True
        sent = 0
        assert self._codec is not None and self._topics is not None
        now = time.monotonic()
        self._budget = min(_PAGE_BUDGET_CAP, self._budget
                           + (now - self._budget_at) * _PAGE_BUDGET_TRICKLE)
        self._budget_at = now
        for page in list(self._dirty if burst_end else self._due):
            if page not in self._dirty:
                self._due.pop(page, None)
                continue
            if sent >= limit:
                self.cut = True
                break
            entries = self._pages[page]
            if not burst_end:
                # Mid-stream, even after flush(): the page is complete only once the burst is.
                if not self._is_due(page):
                    continue
            elif not self.forced:
                if now - self._sent_at[page] < _PAGE_MIN_INTERVAL:
                    # A trickle of updates must not re-send (and re-sign) the page each time.
                    self._wake_later(self._sent_at[page] + _PAGE_MIN_INTERVAL - now)
                    continue
                if self._budget < self._sent[page]:
                    self._wake_later((self._sent[page] - self._budget) / _PAGE_BUDGET_TRICKLE)
                    return True
            rows, self._rows[page] = self._rows[page], {}
            self._waiting[page] = 0
            del self._dirty[page]
            self._due.pop(page, None)
            self._changed[page] = 0
            self._sent_at[page] = now
            cut = self._cutter.cut(page, entries)
            if burst_end and not self.forced:
                self._budget = max(0.0, self._budget - cut.body_bytes)
            self._sent[page] = cut.body_bytes
            if cut.oversized:
                rows = self._oversized(page, cut.oversized, rows)
            if not await self._publish(conn, window, page, cut.parts, rows):
                return False
            sent += max(1, len(cut.parts))  # a slice counts messages: a page in parts is more
        return True

    def _oversized(self, page: int, topics: list[str],
                   rows: dict[int, tuple[int, str]]) -> dict[int, tuple[int, str]]:
        """States whose item alone is over a message: left out of the snapshot and counted
        (late joiners lack them); their rows are done, as no message can carry them (kept,
        they would hold flush() for ever). The rows of the other states are returned."""
        self._counters.dropped["checkpoint_oversized"] += len(topics)
        log.warning("%d state(s) of checkpoint page %d are each over max_message_bytes: late "
                    "joiners will lack them; raise max_message_bytes across the network (and "
                    "the brokers' limit) (docs/DESIGN.md, Sync and presence)", len(topics), page)
        left_out = set(topics)
        done = [row for row, (_n, topic) in rows.items() if topic in left_out]
        if done:
            self._ack(done)
        return {row: v for row, v in rows.items() if v[1] not in left_out}

    async def _publish(self, conn: Connection, window: Window, page: int,
                       parts: list[SignedPart], rows: dict[int, tuple[int, str]]) -> bool:
        """Publish ``page`` as signed (its parts in order), then clear the part topics it no
        longer uses; each part takes the ``rows`` of the states it carries. False if the
        connection broke (the page is sent again after reconnecting)."""
        assert self._topics is not None
        before = self._on_broker[page]
        for part in range(len(parts), before):
            self.logged.pop(checkpoint_slot(page, part), None)
        for signed in parts:
            self.logged[checkpoint_slot(page, signed.part)] = signed.sequence
        self._on_broker[page] = len(parts)
        if not parts and rows:
            self._ack(list(rows))  # a page of oversized states alone: nothing carries them
        by_part = _rows_by_part(parts, rows)
        for signed, part_rows in zip(parts, by_part, strict=True):
            payload = signed.payload
            await window.acquire(len(payload))
            try:
                fut = conn.publish(self._topics.checkpoint(self._node_id, page, signed.part),
                                   payload, qos=1, retain=True)
            except TransportError as exc:
                window.release(len(payload))
                self._broke(page, before, by_part[signed.part:])
                log.info("publish stopped: %s", exc)
                return False
            self._inflight += 1
            self._counters.messages_out += 1
            fut.add_done_callback(functools.partial(self._page_done, page=page, window=window,
                                                    nbytes=len(payload), rows=part_rows))
        for part in range(len(parts), before):
            # A part of a larger earlier version: cleared, so that no reader takes it (its
            # states are older than the same states' in the parts just sent).
            try:
                fut = conn.publish(self._topics.checkpoint(self._node_id, page, part), b"",
                                   qos=1, retain=True)
            except TransportError as exc:
                self._broke(page, before, [])
                log.info("publish stopped: %s", exc)
                return False
            self._inflight += 1
            self._counters.messages_out += 1
            fut.add_done_callback(functools.partial(self._cleared, page=page, parts=before))
        return True

    def _broke(self, page: int, before: int, unsent: list[dict[int, tuple[int, str]]]) -> None:
        """The connection broke while ``page`` went out: it goes again, whole, and clears
        what ``before`` parts left."""
        self._dirty[page] = None
        self._on_broker[page] = max(self._on_broker[page], before)
        for rows in unsent:
            self._put_back(page, rows)

    def _page_done(self, f: asyncio.Future[None], *, page: int,
                   window: Window, nbytes: int, rows: dict[int, tuple[int, str]]) -> None:
        window.release(nbytes)
        self._inflight -= 1
        if f.cancelled() or f.exception() is not None:
            self._dirty[page] = None  # sent again after reconnecting
            self._put_back(page, rows)
            return
        if rows:
            self._ack(list(rows))  # ends in settled() once the outbox recorded it
        else:
            self._settled()

    def _cleared(self, f: asyncio.Future[None], *, page: int, parts: int) -> None:
        self._inflight -= 1
        if f.cancelled() or f.exception() is not None:
            # Cleared again (with the page) after reconnecting.
            self._dirty[page] = None
            self._on_broker[page] = max(self._on_broker[page], parts)
            return
        self._settled()

    def keep_state(self, topic: str, item_json: bytes, *, only_new: bool = False,
                   row: int | None = None) -> None:
        """Record a state item for its checkpoint page; ``row``: its outbox row, acknowledged
        once a page carrying it is."""
        page = zlib.crc32(topic.encode()) % CHECKPOINT_PAGES
        entries = self._pages[page]
        if row is not None and row not in self._rows[page]:
            self._rows[page][row] = (len(item_json), topic)
            self._waiting[page] += len(item_json)
        if only_new and topic in entries:
            return
        assert self._topics is not None
        category = self._topics.category_of_state(self._node_id, topic)
        entry = b"%s:%s" % (json.dumps(category).encode(), item_json)
        entries[topic] = entry
        self._dirty[page] = None
        self._changed[page] += len(entry)
        if self._is_due(page):
            self._due[page] = None
        self._budget += len(entry)

    def _is_due(self, page: int) -> bool:
        """Whether ``page`` is worth sending mid-stream: the bytes changed in it reached its
        last size, or its waiting outbox rows their bound."""
        return (self._changed[page] >= max(self._sent[page], _PAGE_MIN_GROWTH)
                or (self._max_waiting is not None
                    and self._waiting[page] >= self._max_waiting))

    def _put_back(self, page: int, rows: dict[int, tuple[int, str]]) -> None:
        """``rows`` wait for ``page`` again (its publish failed)."""
        waiting = self._rows[page]
        for row, value in rows.items():
            if row not in waiting:
                waiting[row] = value
                self._waiting[page] += value[0]

    def seed_page(self, page: int, states: dict[str, bytes], *, sequence: int,
                  part: int = 0, parts: int = 1) -> None:
        """Take in part ``part`` (of ``parts``) of this node's own page ``page`` as the
        broker holds it, read back by :meth:`seed` (``states``: state topic -> item JSON;
        ``sequence``: its envelope's). States this run has recorded meanwhile stay, and of
        a state read back twice the later signed; the page is not sent again for what it
        already holds."""
        entries = self._pages[page]
        seeded = self._seed_sequence
        assert self._topics is not None
        for topic, item_json in states.items():
            if topic in entries and seeded.get(topic, sequence) >= sequence:
                continue
            category = self._topics.category_of_state(self._node_id, topic)
            entries[topic] = b"%s:%s" % (json.dumps(category).encode(), item_json)
            seeded[topic] = sequence
        self._sent[page] = max(self._sent[page], sum(len(e) + 1 for e in entries.values()))
        self._on_broker[page] = max(self._on_broker[page], part + 1)
        if part < parts:  # else left by a crash before it was cleared: named by no head
            self.logged.setdefault(checkpoint_slot(page, part), sequence)

    @property
    def held(self) -> int:
        """States held in the pages."""
        return sum(len(entries) for entries in self._pages)

    async def seed(self, conn: Connection) -> None:
        """Read back this node's retained states (an earlier run's), so that the first page
        it sends holds them too: its own pages, and first its per-category state topics
        when it keeps them (a crash may have left the pages behind those). What is read
        back never replaces a state this run has recorded meanwhile."""
        assert self._topics is not None and self._markers is not None
        t = self._topics
        filters = [t.node_checkpoint_filter(self._node_id)]
        if self._state_topics:
            filters.insert(0, t.node_state_filter(self._node_id))
        self._seeding = True
        try:
            for topic_filter in filters:
                await conn.subscribe([(topic_filter, 1)])
                # mosquitto sends the retained states before the later marker; a broker that
                # streams them after the SUBACK in no set order (aedes) may not have: the
                # read ends once a round trip brings no further state back.
                for _ in range(_SEED_ROUNDS):
                    before = self.held
                    await self._markers.round_trip(conn)
                    if self.held == before:
                        break
                await conn.unsubscribe([topic_filter])
        finally:
            self._seeding = False
            self._seed_sequence = {}
        self._seeded = True
        self._wake()


def _rows_by_part(parts: list[SignedPart], rows: dict[int, tuple[int, str]]
                  ) -> list[dict[int, tuple[int, str]]]:
    """``rows`` split by the part carrying their state (a page in one envelope: all)."""
    if len(parts) <= 1:
        return [rows] * len(parts)
    out: list[dict[int, tuple[int, str]]] = [{} for _ in parts]
    for row, value in rows.items():
        for signed, part_rows in zip(parts, out, strict=True):
            if signed.topics is None or value[1] in signed.topics:
                part_rows[row] = value
                break
        else:
            out[0][row] = value
    return out
