"""Reading a node's own checkpoint pages (and per-category states) back when it starts, so
that the first page it sends holds an earlier run's states too and keeps the part layout the
broker has (docs/DESIGN.md, Sync and presence: Size)."""

from __future__ import annotations

import zlib
from collections.abc import Callable

from ..model.topics import CHECKPOINT_PAGES, TopicScheme, checkpoint_slot
from ..transport import Connection
from .markers import Markers
from .pageparts import PageCutter, PageLayout
from .pagerows import PagePart, PageRows

__all__ = ["PageSeed"]

_SEED_ROUNDS = 20  # marker round trips at most, while each still brings own states back


class PageSeed:
    """The read-back of one node's pages, sharing their state with :class:`CheckpointPages`
    (``pages``, ``layouts``, ``rows``, ``on_broker``, ``whole``, ``logged``). ``entry``
    makes a page entry of a state item; ``changed`` and ``record_row`` place what this run
    recorded before the read-back once it is done."""

    def __init__(self, *, node_id: str, state_topics: bool, seeded: bool,
                 pages: list[dict[str, bytes]], layouts: list[PageLayout], rows: PageRows,
                 on_broker: list[int], whole: list[bool], logged: dict[int, int],
                 cutter: PageCutter, entry: Callable[[str, bytes], bytes],
                 changed: Callable[[int, PagePart, int], None],
                 record_row: Callable[[int, str, int, int], None]) -> None:
        self._node_id = node_id
        self._state_topics = state_topics
        self._pages, self._layouts, self._rows = pages, layouts, rows
        self._on_broker, self._whole, self._logged = on_broker, whole, logged
        self._cutter = cutter
        self._entry, self._changed, self._record_row = entry, changed, record_row
        self.seeded = seeded
        """The node's earlier states were read back: pages may be sent."""
        self.seeding = False
        # While seeding: state topic -> sequence of the own part it was read back from (a
        # part left over from an earlier version may be older than the current one).
        self._sequence: dict[str, int] = {}
        # States recorded before the pages were read back (state topic -> page) and their
        # outbox rows: placed once the parts they belong to are known.
        self._early: dict[str, int] = {}
        self._early_rows: list[tuple[int, int, str]] = []  # (row, item bytes, state topic)

    @property
    def held(self) -> int:
        """States held in the pages."""
        return sum(len(entries) for entries in self._pages)

    @property
    def early(self) -> bool:
        """States (or their rows) recorded before the read-back wait to be placed."""
        return bool(self._early or self._early_rows)

    def keep(self, page: int, topic: str, entry: bytes, row: int | None, nbytes: int) -> None:
        """A state recorded before the read-back: placed after it, in the part the broker
        holds it in (if any)."""
        entries, layout = self._pages[page], self._layouts[page]
        old = entries.get(topic)
        if old is not None and topic in layout.part_of:
            layout.place(topic, len(old) + 1, len(entry) + 1, self._cutter.cap)
        entries[topic] = entry
        self._early[topic] = page
        if row is not None:
            self._early_rows.append((row, nbytes, topic))

    def keep_row(self, row: int, nbytes: int, topic: str) -> None:
        """The outbox row of a state recorded before the read-back, placed after it."""
        self._early_rows.append((row, nbytes, topic))

    def seed_page(self, page: int, states: dict[str, bytes], *, sequence: int,
                  part: int, parts: int) -> None:
        """See :meth:`CheckpointPages.seed_page`."""
        entries, layout = self._pages[page], self._layouts[page]
        seeded = self._sequence
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
            entry = self._entry(topic, item_json)
            entries[topic] = entry
            layout.put(topic, part, before, len(entry) + 1)
        self._rows.match(page)
        p = self._rows.parts[page][part]
        p.dirty = False  # as the broker holds it (this run's states mark it after the read)
        p.sent = max(p.sent, layout.sizes[part])
        self._on_broker[page] = max(self._on_broker[page], part + 1)
        self._whole[page] = parts == 1 and part == 0
        self._logged.setdefault(checkpoint_slot(page, part), sequence)

    async def seed(self, conn: Connection, topics: TopicScheme, markers: Markers) -> None:
        """See :meth:`CheckpointPages.seed`."""
        filters = [topics.node_checkpoint_filter(self._node_id)]
        if self._state_topics:
            filters.insert(0, topics.node_state_filter(self._node_id))
        self.seeding = True
        try:
            for topic_filter in filters:
                await conn.subscribe([(topic_filter, 1)])
                # mosquitto sends the retained states before the later marker; a broker that
                # streams them after the SUBACK in no set order (aedes) may not have: the
                # read ends once a round trip brings no further state back.
                for _ in range(_SEED_ROUNDS):
                    before = self.held
                    await markers.round_trip(conn)
                    if self.held == before:
                        break
                await conn.unsubscribe([topic_filter])
        finally:
            self.seeding = False
            self._sequence = {}
        self.seeded = True
        self._seeded_layouts()

    def _seeded_layouts(self) -> None:
        """After reading back: a part left empty (its states came later in another) goes
        again empty, or is cleared when it is the last; a page with parts whose part 0
        lost its place goes again whole if it fits."""
        rows = self._rows
        early, self._early = self._early, {}
        for topic, page in early.items():
            n = len(self._pages[page][topic]) + 1
            layout = self._layouts[page]
            if topic not in layout.part_of:
                layout.place(topic, 0, n, self._cutter.cap)
            rows.match(page)
            self._changed(page, rows.parts[page][layout.part_of[topic]], n)
        early_rows, self._early_rows = self._early_rows, []
        for row, nbytes, topic in early_rows:
            self._record_row(zlib.crc32(topic.encode()) % CHECKPOINT_PAGES, topic, row, nbytes)
        for page in range(CHECKPOINT_PAGES):
            layout = self._layouts[page]
            if not self._on_broker[page]:
                continue
            layout.trim()
            rows.match(page)
            for i, p in enumerate(rows.parts[page]):
                if not layout.parts[i]:
                    p.dirty = True
            if any(p.dirty for p in rows.parts[page]) \
                    or self._on_broker[page] > len(layout.parts):
                rows.dirty[page] = None
