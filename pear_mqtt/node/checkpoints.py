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

from ..errors import OversizedMessage, TransportError
from ..model.topics import CHECKPOINT_PAGES, TopicScheme, checkpoint_slot
from ..security.envelope import EnvelopeCodec
from ..transport import Connection
from .counters import Counters
from .markers import Markers
from .pageparts import PageCutter, PageLayout, SignedPart
from .pagerows import PagePart, PageRows, Rows, is_due
from .pageseed import PageSeed
from .window import Window

__all__ = ["CheckpointPages"]

log = logging.getLogger(__name__)

# Refreshes are paced so that they cost about as much as the state traffic itself, whatever
# the update pattern: while states stream, a part is re-sent once the bytes changed in it
# reach three times its size (pagerows.is_due); when a burst ends, the changed pages go
# out as a byte budget allows (the state bytes sent plus a trickle); flush() and
# disconnect() send whatever is pending at once.
_PAGE_BUDGET_TRICKLE = 64 * 1024  # page bytes per second allowed on top of the state bytes
_PAGE_BUDGET_CAP = 64 * 1024 * 1024
_PAGE_MIN_INTERVAL = 1.0  # s between two refreshes of one page when a burst ends
_CUT_ATTEMPTS = 4  # fits tried with a larger overhead estimate when a part did not fit
_RETRY = 1.0  # s before a page whose parts did not fit is tried again


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
        self._rows = PageRows(layouts=self._layouts, max_waiting=max_waiting)
        # Bound once: keep_state calls them per state.
        self._match, self._wait = self._rows.match, self._rows.wait
        self._part_changed = self._rows.changed
        self._dirty, self._due = self._rows.dirty, self._rows.due
        self._cutter = PageCutter(node_id=node_id)
        # Part topics of each page that may hold a retained message (those past the page's
        # parts are cleared when it is next sent).
        self._on_broker = [0] * CHECKPOINT_PAGES
        # The page went (or was read back) as one envelope: if it now needs parts, all go.
        self._whole = [False] * CHECKPOINT_PAGES
        # States whose item alone is over a message, left out since the page was sent.
        self._left_out: dict[int, list[str]] = {}
        self._sent_at = [0.0] * CHECKPOINT_PAGES  # monotonic time it was last sent
        self._budget = 0.0
        self._budget_at = time.monotonic()
        self._inflight = 0
        self._seed = PageSeed(node_id=node_id, state_topics=state_topics, seeded=seeded,
                              pages=self._pages, layouts=self._layouts, rows=self._rows,
                              on_broker=self._on_broker, whole=self._whole,
                              logged=self.logged, cutter=self._cutter, entry=self._entry,
                              changed=self._changed, record_row=self._record_row)
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
        return self._seed.seeded

    @property
    def seeding(self) -> bool:
        """The node's own retained states are being read back (see :meth:`seed`)."""
        return self._seed.seeding

    @property
    def settled(self) -> bool:
        """No page is changed or waiting for its acknowledgement (states recorded before
        the read-back wait for it: they are placed, and sent, only after it)."""
        return not self._dirty and not self._inflight and not self._seed.early

    async def send(self, conn: Connection, window: Window, *,
                   burst_end: bool, limit: int) -> bool:
        """Send the changed parts the pacing allows (all of them while :attr:`forced`),
        ``limit`` messages at most, the parts of a page due together at once (:attr:`cut`
        tells whether more were due); False if the connection broke."""
        self.cut = False
        if self._rows.orphans:
            done, self._rows.orphans = self._rows.orphans, []
            self._ack(done)
        if not self._dirty or not self._seed.seeded:
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
            parts = self._rows.parts[page]
            if not burst_end:
                # Mid-stream, even after flush(): the page is complete only once the burst is.
                targets = [i for i, p in enumerate(parts) if p.dirty and is_due(p)]
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
            parts = self._rows.parts[page]
            if not any(p.dirty for p in parts):
                del self._dirty[page]
            if not any(p.dirty and is_due(p) for p in parts):
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
                self._rows.collapse(page)
                self._whole[page] = True
                return [(whole[0], whole[1], self._rows.take(page, 0))]
        wanted = set(targets)
        for _ in range(_CUT_ATTEMPTS):
            moved, oversized = layout.fit(lambda t: len(entries[t]) + 1, cutter.cap)
            for topic in oversized:
                self._leave_out(page, topic)
                self._report_left_out(page)
            self._match(page)
            for topic, (was, now) in moved.items():
                self._rows.move(page, topic, was, now)
                wanted.update((was, now))
            layout.trim()
            self._match(page)
            parts = self._rows.parts[page]
            if self._whole[page]:
                wanted.update(range(len(parts)))
            chosen = sorted(i for i in wanted if i < len(parts))
            try:
                signed = [cutter.part(page, i, len(parts), layout.parts[i], entries)
                          for i in chosen]
            except OversizedMessage:
                continue  # the cap shrank: fit the layout again
            self._whole[page] = False
            return [(s, n, self._rows.take(page, s.part, body=n)) for s, n in signed]
        log.warning("checkpoint page %d: its parts did not fit max_message_bytes after %d "
                    "tries; trying again", page, _CUT_ATTEMPTS)
        return None

    def _leave_out(self, page: int, topic: str) -> None:
        """A state whose item alone is over a message: out of the page (late joiners lack
        it, counted when the page is next sent) and its rows done, as no message can carry
        it (kept, they would hold flush() for ever)."""
        self._pages[page].pop(topic, None)
        self._left_out.setdefault(page, []).append(topic)
        self._rows.drop(page, topic)

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
        before, count = self._on_broker[page], len(self._rows.parts[page])
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
                    self._rows.redo(page, later.part, later_rows)
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

    def _part_done(self, f: asyncio.Future[None], *, page: int, part: int,
                   window: Window, nbytes: int, rows: Rows) -> None:
        window.release(nbytes)
        self._inflight -= 1
        if f.cancelled() or f.exception() is not None:
            self._rows.redo(page, part, rows)  # sent again after reconnecting
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
        cap = self._cutter.cap
        if n > cap and not self._cutter.may_fit(n):
            layout.drop(topic, 0 if old is None else len(old) + 1)
            self._leave_out(page, topic)
            if row is not None:
                self._rows.orphans.append(row)
            self._dirty[page] = None
            return
        if not self._seed.seeded:
            self._seed.keep(page, topic, entry, row, len(item_json))
            return
        entries[topic] = entry
        part = layout.place(topic, 0 if old is None else len(old) + 1, n, cap)
        self._match(page)
        p = self._rows.parts[page][part]
        if row is not None:
            self._wait(page, part, row, len(item_json), topic)
        self._part_changed(page, p, n)  # as _changed(), without a second call per state
        self._budget += n

    def _record_row(self, page: int, topic: str, row: int, nbytes: int) -> None:
        """Outbox row ``row`` of a state ``topic`` whose entry is already held waits for
        the part holding it."""
        if not self._seed.seeded:
            self._seed.keep_row(row, nbytes, topic)
        else:
            self._wait(page, self._layouts[page].part_of.get(topic, 0), row, nbytes, topic)

    def _changed(self, page: int, p: PagePart, n: int) -> None:
        """``n`` bytes of part ``p`` of ``page`` changed (and the page budget grows)."""
        self._rows.changed(page, p, n)
        self._budget += n

    def _entry(self, topic: str, item_json: bytes) -> bytes:
        """The page entry of a state item: ``"<category>":<item JSON>``."""
        assert self._topics is not None
        category = self._topics.category_of_state(self._node_id, topic)
        return b"%s:%s" % (json.dumps(category).encode(), item_json)

    def seed_page(self, page: int, states: dict[str, bytes], *, sequence: int,
                  part: int = 0, parts: int = 1) -> None:
        """Take in part ``part`` (of ``parts``) of this node's own page ``page`` as the
        broker holds it, read back by :meth:`seed` (``states``: state topic -> item JSON;
        ``sequence``: its envelope's). States this run has recorded meanwhile stay, and of
        a state read back twice the later signed, in the part it came in; the page keeps
        that layout and is not sent again for what it already holds."""
        self._seed.seed_page(page, states, sequence=sequence, part=part, parts=parts)

    @property
    def held(self) -> int:
        """States held in the pages."""
        return self._seed.held

    async def seed(self, conn: Connection) -> None:
        """Read back this node's retained states (an earlier run's), so that the first page
        it sends holds them too: its own pages, and first its per-category state topics
        when it keeps them (a crash may have left the pages behind those). What is read
        back never replaces a state this run has recorded meanwhile."""
        assert self._topics is not None and self._markers is not None
        await self._seed.seed(conn, self._topics, self._markers)
        self._wake()
