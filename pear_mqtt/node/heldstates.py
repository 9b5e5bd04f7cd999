"""The retained state rows a sender holds back while a burst lasts (docs/DESIGN.md, Sync)."""

from __future__ import annotations

import time
from collections import OrderedDict

from .outbox import OutboxItem

__all__ = ["HeldStates"]


class HeldStates:
    """The newest held state row per category, oldest change first, and the categories
    whose state lately rode on a live envelope.

    An OrderedDict: taking the first entry of a plain dict over and over skips every slot
    emptied before it (quadratic with 100,000 held states).
    """

    def __init__(self) -> None:
        self._rows: OrderedDict[str, OutboxItem] = OrderedDict()
        self._since = 0.0
        self._shared_at: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    def hold(self, row: OutboxItem) -> None:
        """Hold ``row``; a newer state of its category replaces the held one."""
        if not self._rows:
            self._since = time.monotonic()
        key = row.key or row.topic
        self._rows.pop(key, None)
        self._rows[key] = row

    def held_for(self, now: float) -> float:
        """Seconds since the oldest held state was taken in."""
        return now - self._since

    def overdue(self, now: float, max_defer: float) -> bool:
        return bool(self._rows) and now - self._since >= max_defer

    def pop_oldest(self) -> OutboxItem:
        return self._rows.popitem(last=False)[1]

    def clear(self) -> None:
        self._rows.clear()

    def take_shared(self, state: OutboxItem, max_defer: float) -> bool:
        """Release ``state`` to go on its live envelope, if it is still the newest held of its
        category and that category's state has not done so within ``max_defer`` seconds:
        a backlog over a few categories then still holds their later states back (and sends
        only the newest) instead of publishing every insight twice."""
        key = state.key or state.topic
        if self._rows.get(key) is not state:
            return False
        now = time.monotonic()
        shared = self._shared_at
        while shared and next(iter(shared.values())) <= now - max_defer:
            shared.popitem(last=False)
        if key in shared:
            return False
        shared[key] = now
        del self._rows[key]
        return True
