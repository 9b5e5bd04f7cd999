"""The outbox of a node with no ``outbox_path``: the on-disk outbox's contract, in memory."""

from __future__ import annotations

import bisect
import time

from .outbox import OutboxItem

__all__ = ["MemoryOutbox"]


class MemoryOutbox:
    """The outbox when none is configured on disk: same contract, lost on exit."""

    def __init__(self) -> None:
        self._rows: dict[int, OutboxItem] = {}
        # Ids in id order, acknowledged ones included until the next compaction: pending()
        # finds its starting point by bisection instead of walking every held row (held-back
        # states and rows in flight stay at the front for a long time).
        self._order: list[int] = []
        self._keys: dict[str, int] = {}
        self._next = 1

    def put_insight(self, *, topic: str, payload: bytes, state_topic: str | None) -> None:
        """Store one insight (``contrib`` when ``state_topic`` is None) and its retained state,
        which replaces the pending one of that topic (``Outbox.put_many``'s contract, without
        the :class:`NewItem` checks: the caller built every value)."""
        now = time.time()
        rid = self._next
        size = len(payload)
        self._rows[rid] = OutboxItem(rid, topic, payload,
                                     "contrib" if state_topic is None else "insight",
                                     None, False, now, size)
        self._order.append(rid)
        if state_topic is not None:
            old = self._keys.get(state_topic)
            if old is not None:
                self._rows.pop(old, None)
            rid += 1
            self._rows[rid] = OutboxItem(rid, state_topic, payload, "state", state_topic,
                                         True, now, size)
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

    def oldest(self) -> float | None:
        return min((row.created for row in self._rows.values()), default=None)

    def close(self) -> None:
        pass
