"""The pacing of each checkpoint page's parts and the outbox rows waiting for them: which
parts changed, which are due mid-stream, and the bound on the rows all parts keep waiting
(docs/DESIGN.md, Sync and presence: Size)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..model.topics import CHECKPOINT_PAGES
from .pageparts import PageLayout

__all__ = ["PagePart", "PageRows", "Rows", "is_due"]

_PAGE_MIN_GROWTH = 32 * 1024  # changed bytes that justify a refresh mid-stream
# ... and their multiple of the part's last size: each refresh re-signs the whole part, so the
# refreshes of a part re-sent whenever it doubled add up to twice its size; at 3x, 1.33x.
_PAGE_GROWTH = 3

Rows = dict[int, tuple[int, str]]
"""Outbox rows waiting for a part: row id -> (its item's bytes, its state topic)."""


@dataclass(slots=True)
class PagePart:
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


def is_due(p: PagePart) -> bool:
    """Whether a part is worth sending mid-stream: the bytes changed in it reached three
    times its last size, or it keeps the most outbox rows waiting (:meth:`PageRows.relieve`)."""
    return p.urgent or p.changed >= max(_PAGE_GROWTH * p.sent, _PAGE_MIN_GROWTH)


class PageRows:
    """The parts' pacing of every page, kept one per part of ``layouts`` (shared with the
    pages). ``dirty``: pages with a part to send, oldest change first; ``due``: of those,
    pages with a part due mid-stream, so that a flusher round does not scan every dirty page;
    ``orphans``: rows no part will carry. ``max_waiting``: see :class:`CheckpointPages`."""

    def __init__(self, *, layouts: list[PageLayout], max_waiting: int | None) -> None:
        self._layouts = layouts
        self._max_waiting = max_waiting
        self.parts: list[list[PagePart]] = [[] for _ in range(CHECKPOINT_PAGES)]
        self.dirty: dict[int, None] = {}
        self.due: dict[int, None] = {}
        self.orphans: list[int] = []
        self._waiting = 0  # bytes of all rows waiting for a part
        self._relieving = 0  # of those, in parts already due to relieve the outbox

    def match(self, page: int) -> None:
        """One pacing per part of the layout: a new part must go; one dropped takes no row
        (a part only drops once empty)."""
        parts, n = self.parts[page], len(self._layouts[page].parts)
        while len(parts) < n:
            parts.append(PagePart(dirty=True))
        for extra in parts[n:]:
            self.orphans.extend(extra.rows)
            self._waiting -= extra.waiting
            self._relieving -= extra.relief
        del parts[n:]

    def collapse(self, page: int) -> None:
        """The page goes whole: its rows all wait for its one part."""
        rows: Rows = {}
        for p in self.parts[page]:
            rows.update(p.rows)
            self._relieving -= p.relief
        self.parts[page] = [PagePart(rows=rows, waiting=sum(n for n, _t in rows.values()))]

    def take(self, page: int, part: int, body: int | None = None) -> Rows:
        """The rows part ``part`` carries as it is signed now; its pacing starts over."""
        p = self.parts[page][part]
        rows, p.rows = p.rows, {}
        self._waiting -= p.waiting
        self._relieving -= p.relief
        p.waiting = p.changed = p.relief = 0
        p.dirty = p.urgent = False
        p.sent = self._layouts[page].sizes[part] if body is None else body
        return rows

    def move(self, page: int, topic: str, was: int, now: int) -> None:
        """State ``topic`` moved from part ``was`` to ``now``: its rows follow it."""
        parts = self.parts[page]
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

    def drop(self, page: int, topic: str) -> None:
        """State ``topic`` left the page: its rows are done, as no part will carry it."""
        for p in self.parts[page]:
            for row, (n, t) in list(p.rows.items()):
                if t == topic:
                    del p.rows[row]
                    p.waiting -= n
                    self._waiting -= n
                    self.orphans.append(row)

    def redo(self, page: int, part: int, rows: Rows) -> None:
        """Part ``part`` of ``page`` did not reach the broker: it goes again, with ``rows``
        waiting for the part that holds their state now."""
        parts, layout = self.parts[page], self._layouts[page]
        if part < len(parts):
            parts[part].dirty = True
        self.dirty[page] = None
        for row, value in rows.items():
            if not parts:
                self.orphans.append(row)  # the page lost every state meanwhile
                continue
            # The part it went in may have dropped meanwhile (once its states moved away).
            at = min(layout.part_of.get(value[1], part), len(parts) - 1)
            if row not in parts[at].rows:
                parts[at].rows[row] = value
                parts[at].waiting += value[0]
                self._waiting += value[0]
                parts[at].dirty = True

    def changed(self, page: int, p: PagePart, n: int) -> None:
        """``n`` bytes of part ``p`` of ``page`` changed."""
        p.changed += n
        p.dirty = True
        self.dirty[page] = None
        if is_due(p):
            self.due[page] = None

    def wait(self, page: int, part: int, row: int, nbytes: int, topic: str) -> None:
        """Outbox row ``row`` waits for part ``part`` of ``page``."""
        self.match(page)
        parts = self.parts[page]
        p = parts[min(part, len(parts) - 1)] if parts else None
        if p is None:
            self.orphans.append(row)
            return
        if row not in p.rows:
            p.rows[row] = (nbytes, topic)
            p.waiting += nbytes
            self._waiting += nbytes
            p.dirty = True
            self.dirty[page] = None
            if is_due(p):
                self.due[page] = None
            if (self._max_waiting is not None and self._waiting - self._relieving
                    >= self._max_waiting * CHECKPOINT_PAGES):
                self.relieve()

    def relieve(self) -> None:
        """Too many rows wait: the part keeping the most is due now (one part at a time, so
        a part goes again only once it holds its share of the outbox's bound)."""
        most: PagePart | None = None
        at = 0
        for page in self.dirty:
            for p in self.parts[page]:
                if not p.urgent and (most is None or p.waiting > most.waiting):
                    most, at = p, page
        if most is None or not most.waiting:
            return
        most.urgent, most.relief = True, most.waiting
        self._relieving += most.waiting
        self.due[at] = None
