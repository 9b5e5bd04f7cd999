"""A node's state checkpoint pages: its current retained states, paged, signed and retained
so that a late joiner reads a few pages instead of thousands of states (docs/DESIGN.md); a
page over one message goes in parts, and only its changed parts go again. Without
per-category state topics a state's outbox row waits here until the part carrying it is
acknowledged."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import OversizedMessage, TransportError
from ..model.topics import CHECKPOINT_PAGES, TopicScheme, checkpoint_slot
from ..security.envelope import EnvelopeCodec
from ..transport import Connection
from .counters import Counters
from .markers import Markers
from .pageparts import PageCutter, PageLayout, SignedPart
from .window import Window

__all__ = ["CheckpointPages"]

log = logging.getLogger(__name__)

# Refreshes are paced so that they cost about as much as the state traffic itself, whatever
# the update pattern: while states stream, a part is re-sent once the bytes changed in it
# reach its size (so it at most doubles each time); when a burst ends, the changed pages go
# out as a byte budget allows (the state bytes sent plus a trickle); flush() and
# disconnect() send whatever is pending at once.
_PAGE_BUDGET_TRICKLE = 64 * 1024  # page bytes per second allowed on top of the state bytes
_PAGE_BUDGET_CAP = 64 * 1024 * 1024
_PAGE_MIN_GROWTH = 16 * 1024  # changed bytes that justify a refresh mid-stream
_SEED_ROUNDS = 20  # marker round trips at most, while each still brings own states back
_PAGE_MIN_INTERVAL = 1.0  # s between two refreshes of one page when a burst ends
_CUT_ATTEMPTS = 4  # fits tried with a larger overhead estimate when a part did not fit
_RETRY = 1.0  # s before a page whose parts did not fit is tried again

Rows = dict[int, tuple[int, str]]
"""Outbox rows waiting for a part: row id -> (its item's bytes, its state topic)."""


@dataclass(slots=True)
class _Part:
    """Pacing of one part: the outbox rows waiting for it (and their bytes), the bytes
    changed since it was last sent and its body's bytes then, whether it must go again, and
    whether it is due to relieve the outbox (``relief``: its waiting bytes then)."""

    rows: Rows = field(default_factory=dict)
    waiting: int = 0
    changed: int = 0
    sent: int = 0
    dirty: bool = False
    urgent: bool = False
    relief: int = 0



class CheckpointPages:
    """The pages of one node: page -> {state topic: ``"<category>":<item JSON>``}.

    Pages are sent only once :attr:`seeded` (the node's earlier states were read back, so a
    page never replaces a fuller one on the broker). The flusher sends them
    (:meth:`send`); ``wake``, ``wake_later`` and ``settled`` are its hooks: look for work
    now, look again after a delay, and check whether everything is acknowledged; ``ack``
    takes the outbox rows of the states a part carried once the broker acknowledged it.
    ``state_topics``: the node also keeps per-category state topics, which it reads back
    before its pages when it starts (they may be newer than the pages). ``max_waiting``:
    bytes of outbox rows a page may keep waiting on average (None: no bound): once all
    parts together keep 256 times this waiting, the part with the most is due mid-stream,
    so that they stay well within the outbox's bound.
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
        self.slots = 0
        """Bumped whenever a part is added to :attr:`logged` or leaves it: a head should
        name the new set soon, or joiners would not wait for a new part."""
        self._pages: list[dict[str, bytes]] = [{} for _ in range(CHECKPOINT_PAGES)]
        self._layouts = [PageLayout() for _ in range(CHECKPOINT_PAGES)]
        self._parts: list[list[_Part]] = [[] for _ in range(CHECKPOINT_PAGES)]
        self._cutter = PageCutter(node_id=node_id)
        # Part topics of each page that may hold a retained message (those past the page's
        # parts are cleared when it is next sent).
        self._on_broker = [0] * CHECKPOINT_PAGES
        # The page went (or was read back) as one envelope: if it now needs parts, all go.
        self._whole = [False] * CHECKPOINT_PAGES
        # States whose item alone is over a message, left out since the page was sent, and
        # the outbox rows no part will carry.
        self._left_out: dict[int, list[str]] = {}
        self._orphans: list[int] = []
        self._dirty: dict[int, None] = {}  # insertion order: oldest change first
        # Dirty pages with a part whose changes justify a refresh mid-stream, so that a
        # flusher round does not scan every dirty page to find the few that are due.
        self._due: dict[int, None] = {}
        self._sent_at = [0.0] * CHECKPOINT_PAGES  # monotonic time it was last sent
        self._budget = 0.0
        self._budget_at = time.monotonic()
        self._inflight = 0
        self._waiting = 0  # bytes of all rows waiting for a part
        self._relieving = 0  # of those, in parts already due to relieve the outbox
        self._seeded = seeded
        self._seeding = False
        # While seeding: state topic -> sequence of the own part it was read back from (a
        # part left over from an earlier version may be older than the current one).
        self._seed_sequence: dict[str, int] = {}
        # States recorded before the pages were read back (state topic -> page) and their
        # outbox rows: placed once the parts they belong to are known.
        self._early: dict[str, int] = {}
        self._early_rows: list[tuple[int, int, str]] = []  # (row, item bytes, state topic)
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
        """No page is changed or waiting for its acknowledgement (states recorded before
        the read-back wait for it: they are placed, and sent, only after it)."""
        return not self._dirty and not self._inflight and not self._early \
            and not self._early_rows

    async def send(self, conn: Connection, window: Window, *,
                   burst_end: bool, limit: int) -> bool:
        """Send the changed parts the pacing allows (all of them while :attr:`forced`),
        ``limit`` messages at most, the parts of a page due together at once (:attr:`cut`
        tells whether more were due); False if the connection broke."""
        self.cut = False
        if self._orphans:
            done, self._orphans = self._orphans, []
            self._ack(done)
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
            parts = self._parts[page]
            if not burst_end:
                # Mid-stream, even after flush(): the page is complete only once the burst is.
                targets = [i for i, p in enumerate(parts) if p.dirty and self._is_due(p)]
                if not targets:
                    self._due.pop(page, None)
                    continue
            else:
                targets = [i for i, p in enumerate(parts) if p.dirty]
                if not self.forced:
                    if now - self._sent_at[page] < _PAGE_MIN_INTERVAL:
                        # A trickle of updates must not re-send (and re-sign) a part each time.
                        self._wake_later(self._sent_at[page] + _PAGE_MIN_INTERVAL - now)
                        continue
                    cost = sum(parts[i].sent for i in targets)
                    if self._budget < cost:
                        self._wake_later((cost - self._budget) / _PAGE_BUDGET_TRICKLE)
                        return True
            self._sent_at[page] = now
            signed = self._sign(page, targets)
            if signed is None:
                self._wake_later(_RETRY)
                continue
            if burst_end and not self.forced:
                self._budget = max(0.0, self._budget - sum(n for _s, n, _r in signed))
            parts = self._parts[page]
            if not any(p.dirty for p in parts):
                del self._dirty[page]
            if not any(p.dirty and self._is_due(p) for p in parts):
                self._due.pop(page, None)
            if not await self._publish(conn, window, page, signed):
                return False
            sent += max(1, len(signed))  # a slice counts messages: a page in parts is more
        return True

    def _sign(self, page: int, targets: list[int]
              ) -> list[tuple[SignedPart, int, Rows]] | None:
        """Sign the parts ``targets`` of ``page`` (with what their layout moved, and all of
        them when the page needs parts where it went whole), or the page whole when it fits
        one message: each with its body's bytes and the rows it carries, which it takes
        from its pacing. None if no layout fitted (tried again later)."""
        entries, layout = self._pages[page], self._layouts[page]
        self._report_left_out(page)
        cutter = self._cutter
        cutter.learn()
        if cutter.may_fit(layout.total):
            whole = cutter.whole(page, entries.values())
            if whole is not None:
                layout.collapse()
                rows: Rows = {}
                for p in self._parts[page]:
                    rows.update(p.rows)
                    self._relieving -= p.relief
                self._parts[page] = [_Part(rows=rows, waiting=sum(n for n, _t in rows.values()))]
                self._whole[page] = True
                return [(whole[0], whole[1], self._take(page, 0))]
        wanted = set(targets)
        for _ in range(_CUT_ATTEMPTS):
            moved, oversized = layout.fit(lambda t: len(entries[t]) + 1, cutter.cap)
            for topic in oversized:
                self._leave_out(page, topic)
                self._report_left_out(page)
            self._match(page)
            for topic, (was, now) in moved.items():
                self._move_rows(page, topic, was, now)
                wanted.update((was, now))
            layout.trim()
            self._match(page)
            parts = self._parts[page]
            if self._whole[page]:
                wanted.update(range(len(parts)))
            chosen = sorted(i for i in wanted if i < len(parts))
            try:
                signed = [cutter.part(page, i, len(parts), layout.parts[i], entries)
                          for i in chosen]
            except OversizedMessage:
                continue  # the cap shrank: fit the layout again
            self._whole[page] = False
            return [(s, n, self._take(page, s.part, body=n)) for s, n in signed]
        log.warning("checkpoint page %d: its parts did not fit max_message_bytes after %d "
                    "tries; trying again", page, _CUT_ATTEMPTS)
        return None

    def _match(self, page: int) -> None:
        """One pacing per part of the layout: a new part must go; one dropped takes no row
        (a part only drops once empty)."""
        parts, n = self._parts[page], len(self._layouts[page].parts)
        while len(parts) < n:
            parts.append(_Part(dirty=True))
        for extra in parts[n:]:
            self._orphans.extend(extra.rows)
            self._waiting -= extra.waiting
            self._relieving -= extra.relief
        del parts[n:]

    def _take(self, page: int, part: int, body: int | None = None) -> Rows:
        """The rows part ``part`` carries as it is signed now; its pacing starts over."""
        p = self._parts[page][part]
        rows, p.rows = p.rows, {}
        self._waiting -= p.waiting
        self._relieving -= p.relief
        p.waiting = p.changed = p.relief = 0
        p.dirty = p.urgent = False
        p.sent = self._layouts[page].sizes[part] if body is None else body
        return rows

    def _move_rows(self, page: int, topic: str, was: int, now: int) -> None:
        parts = self._parts[page]
        if was >= len(parts) or now >= len(parts):
            return
        src, dst = parts[was], parts[now]
        for row, value in list(src.rows.items()):
            if value[1] == topic:
                del src.rows[row]
                src.waiting -= value[0]
                dst.rows[row] = value
                dst.waiting += value[0]
        src.dirty = dst.dirty = True

    def _leave_out(self, page: int, topic: str) -> None:
        """A state whose item alone is over a message: out of the page (late joiners lack
        it, counted when the page is next sent) and its rows done, as no message can carry
        it (kept, they would hold flush() for ever)."""
        self._pages[page].pop(topic, None)
        self._left_out.setdefault(page, []).append(topic)
        for p in self._parts[page]:
            for row, (_n, t) in list(p.rows.items()):
                if t == topic:
                    del p.rows[row]
                    p.waiting -= _n
                    self._waiting -= _n
                    self._orphans.append(row)

    def _report_left_out(self, page: int) -> None:
        topics = self._left_out.pop(page, None)
        if not topics:
            return
        self._counters.dropped["checkpoint_oversized"] += len(topics)
        log.warning("%d state(s) of checkpoint page %d are each over max_message_bytes: late "
                    "joiners will lack them; raise max_message_bytes across the network (and "
                    "the brokers' limit) (docs/DESIGN.md, Sync and presence)", len(topics), page)

    async def _publish(self, conn: Connection, window: Window, page: int,
                       signed: list[tuple[SignedPart, int, Rows]]) -> bool:
        """Publish the parts ``signed`` of ``page`` in order, then clear the part topics it
        no longer uses; each part acknowledges its rows once the broker has it. False if the
        connection broke (what did not go is sent again after reconnecting)."""
        assert self._topics is not None
        before, count = self._on_broker[page], len(self._parts[page])
        for part in range(count, before):
            if self.logged.pop(checkpoint_slot(page, part), None) is not None:
                self.slots += 1
        for s, _n, _rows in signed:
            slot = checkpoint_slot(page, s.part)
            if slot not in self.logged:
                self.slots += 1
            self.logged[slot] = s.sequence
        self._on_broker[page] = max(min(before, count),
                                    max((s.part + 1 for s, _n, _r in signed), default=0))
        for i, (s, _n, rows) in enumerate(signed):
            payload = s.payload
            await window.acquire(len(payload))
            try:
                fut = conn.publish(self._topics.checkpoint(self._node_id, page, s.part),
                                   payload, qos=1, retain=True)
            except TransportError as exc:
                window.release(len(payload))
                for later, _m, later_rows in signed[i:]:
                    self._redo(page, later.part, later_rows)
                self._on_broker[page] = max(self._on_broker[page], before)
                log.info("publish stopped: %s", exc)
                return False
            self._inflight += 1
            self._counters.messages_out += 1
            fut.add_done_callback(functools.partial(self._part_done, page=page, part=s.part,
                                                    window=window, nbytes=len(payload),
                                                    rows=rows))
        for part in range(count, before):
            # A part the page no longer has: cleared, so that no reader takes it (its states
            # are older than the same states' in the parts of the page now).
            try:
                fut = conn.publish(self._topics.checkpoint(self._node_id, page, part), b"",
                                   qos=1, retain=True)
            except TransportError as exc:
                self._on_broker[page] = max(self._on_broker[page], before)
                self._dirty[page] = None
                log.info("publish stopped: %s", exc)
                return False
            self._inflight += 1
            self._counters.messages_out += 1
            fut.add_done_callback(functools.partial(self._cleared, page=page, parts=before))
        return True

    def _redo(self, page: int, part: int, rows: Rows) -> None:
        """Part ``part`` of ``page`` did not reach the broker: it goes again, with ``rows``
        waiting for the part that holds their state now."""
        parts, layout = self._parts[page], self._layouts[page]
        if part < len(parts):
            parts[part].dirty = True
        self._dirty[page] = None
        for row, value in rows.items():
            at = layout.part_of.get(value[1], part)
            if at < len(parts) and row not in parts[at].rows:
                parts[at].rows[row] = value
                parts[at].waiting += value[0]
                self._waiting += value[0]
                parts[at].dirty = True

    def _part_done(self, f: asyncio.Future[None], *, page: int, part: int,
                   window: Window, nbytes: int, rows: Rows) -> None:
        window.release(nbytes)
        self._inflight -= 1
        if f.cancelled() or f.exception() is not None:
            self._redo(page, part, rows)  # sent again after reconnecting
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
        once the part carrying it is."""
        page = zlib.crc32(topic.encode()) % CHECKPOINT_PAGES
        entries, layout = self._pages[page], self._layouts[page]
        if only_new and topic in entries:
            if row is not None:
                self._record_row(page, topic, row, len(item_json))
            return
        assert self._topics is not None
        category = self._topics.category_of_state(self._node_id, topic)
        entry = b"%s:%s" % (json.dumps(category).encode(), item_json)
        old = entries.get(topic)
        n = len(entry) + 1
        self._cutter.learn()
        if n > self._cutter.cap and not self._cutter.may_fit(n):
            layout.drop(topic, 0 if old is None else len(old) + 1)
            self._leave_out(page, topic)
            if row is not None:
                self._orphans.append(row)
            self._dirty[page] = None
            return
        if not self._seeded:
            # Placed after the read-back, in the part the broker holds it in (if any).
            if old is not None and topic in layout.part_of:
                layout.place(topic, len(old) + 1, n, self._cutter.cap)
            entries[topic] = entry
            self._early[topic] = page
            if row is not None:
                self._early_rows.append((row, len(item_json), topic))
            return
        entries[topic] = entry
        part = layout.place(topic, 0 if old is None else len(old) + 1, n, self._cutter.cap)
        self._match(page)
        p = self._parts[page][part]
        if row is not None:
            self._wait(page, part, row, len(item_json), topic)
        self._changed(page, p, n)

    def _record_row(self, page: int, topic: str, row: int, nbytes: int) -> None:
        """Outbox row ``row`` of a state ``topic`` whose entry is already held waits for
        the part holding it."""
        if not self._seeded:
            self._early_rows.append((row, nbytes, topic))
        else:
            self._wait(page, self._layouts[page].part_of.get(topic, 0), row, nbytes, topic)

    def _changed(self, page: int, p: _Part, n: int) -> None:
        """``n`` bytes of part ``p`` of ``page`` changed."""
        p.changed += n
        p.dirty = True
        self._dirty[page] = None
        if self._is_due(p):
            self._due[page] = None
        self._budget += n

    def _wait(self, page: int, part: int, row: int, nbytes: int, topic: str) -> None:
        """Outbox row ``row`` waits for part ``part`` of ``page``."""
        self._match(page)
        parts = self._parts[page]
        p = parts[min(part, len(parts) - 1)] if parts else None
        if p is None:
            self._orphans.append(row)
            return
        if row not in p.rows:
            p.rows[row] = (nbytes, topic)
            p.waiting += nbytes
            self._waiting += nbytes
            p.dirty = True
            self._dirty[page] = None
            if self._is_due(p):
                self._due[page] = None
            if (self._max_waiting is not None and self._waiting - self._relieving
                    >= self._max_waiting * CHECKPOINT_PAGES):
                self._relieve()

    def _relieve(self) -> None:
        """Too many rows wait: the part keeping the most is due now (one part at a time, so
        a part goes again only once it holds its share of the outbox's bound)."""
        most: _Part | None = None
        at = 0
        for page in self._dirty:
            for p in self._parts[page]:
                if not p.urgent and (most is None or p.waiting > most.waiting):
                    most, at = p, page
        if most is None or not most.waiting:
            return
        most.urgent, most.relief = True, most.waiting
        self._relieving += most.waiting
        self._due[at] = None

    def _is_due(self, p: _Part) -> bool:
        """Whether a part is worth sending mid-stream: the bytes changed in it reached its
        last size, or it keeps the most outbox rows waiting (:meth:`_relieve`)."""
        return p.urgent or p.changed >= max(p.sent, _PAGE_MIN_GROWTH)

    def seed_page(self, page: int, states: dict[str, bytes], *, sequence: int,
                  part: int = 0, parts: int = 1) -> None:
        """Take in part ``part`` (of ``parts``) of this node's own page ``page`` as the
        broker holds it, read back by :meth:`seed` (``states``: state topic -> item JSON;
        ``sequence``: its envelope's). States this run has recorded meanwhile stay, and of
        a state read back twice the later signed, in the part it came in; the page keeps
        that layout and is not sent again for what it already holds."""
        entries, layout = self._pages[page], self._layouts[page]
        seeded = self._seed_sequence
        assert self._topics is not None
        for topic, item_json in states.items():
            if seeded.get(topic, -1) >= sequence:
                continue  # read back from a later-signed part already
            seeded[topic] = sequence
            old = entries.get(topic)
            before = 0 if old is None or topic not in layout.part_of else len(old) + 1
            if topic in self._early:
                # This run's newer state keeps its entry, in the part the broker has it in.
                assert old is not None
                layout.put(topic, part, before, len(old) + 1)
                continue
            category = self._topics.category_of_state(self._node_id, topic)
            entry = b"%s:%s" % (json.dumps(category).encode(), item_json)
            entries[topic] = entry
            layout.put(topic, part, before, len(entry) + 1)
        self._match(page)
        p = self._parts[page][part]
        p.dirty = False  # as the broker holds it (this run's states mark it after the read)
        p.sent = max(p.sent, layout.sizes[part])
        self._on_broker[page] = max(self._on_broker[page], part + 1)
        self._whole[page] = parts == 1 and part == 0
        self.logged.setdefault(checkpoint_slot(page, part), sequence)

    def _seeded_layouts(self) -> None:
        """After reading back: a part left empty (its states came later in another) goes
        again empty, or is cleared when it is the last; a page with parts whose part 0
        lost its place goes again whole if it fits."""
        early, self._early = self._early, {}
        for topic, page in early.items():
            n = len(self._pages[page][topic]) + 1
            layout = self._layouts[page]
            if topic not in layout.part_of:
                layout.place(topic, 0, n, self._cutter.cap)
            self._match(page)
            part = layout.part_of[topic]
            self._changed(page, self._parts[page][part], n)
        rows, self._early_rows = self._early_rows, []
        for row, nbytes, topic in rows:
            self._record_row(zlib.crc32(topic.encode()) % CHECKPOINT_PAGES, topic, row, nbytes)
        for page in range(CHECKPOINT_PAGES):
            layout = self._layouts[page]
            if not self._on_broker[page]:
                continue
            layout.trim()
            self._match(page)
            for i, p in enumerate(self._parts[page]):
                if not layout.parts[i]:
                    p.dirty = True
            if any(p.dirty for p in self._parts[page]) \
                    or self._on_broker[page] > len(layout.parts):
                self._dirty[page] = None

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
        self._seeded_layouts()
        self._wake()

