"""Outbox rows in flight when the connection was closed: a broker without negative PUBACKs
(MQTT 3.1.1, e.g. aedes) refuses a forbidden publish by closing the connection, so a row that
keeps being in flight when it closes is sent alone, and then refused (deploy/cluster/README.md)."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ALONE_AFTER", "REFUSED_AFTER", "Suspects"]

ALONE_AFTER = 2
"""Closes a row was in flight at before it is sent alone, its PUBACK awaited."""
REFUSED_AFTER = 2
"""Closes while it was alone in flight that prove it refused (a crash or a cut cable would
have to hit the millisecond of that round trip twice to be taken for one)."""


class Suspects:
    """How many closes each unacknowledged row was in flight at, and how many of them while
    it was the only one."""

    __slots__ = ("_alone", "_closes", "_sending_alone")

    def __init__(self) -> None:
        self._closes: dict[int, int] = {}
        self._alone: dict[int, int] = {}
        self._sending_alone: set[int] = set()

    def __bool__(self) -> bool:
        return bool(self._closes)

    def closed(self, rows: Iterable[int]) -> None:
        """The connection closed with ``rows`` unacknowledged."""
        for row in rows:
            self._closes[row] = self._closes.get(row, 0) + 1
            if row in self._sending_alone:
                self._sending_alone.discard(row)
                self._alone[row] = self._alone.get(row, 0) + 1

    def acked(self, rows: Iterable[int]) -> None:
        if self._closes:
            for row in rows:
                self._closes.pop(row, None)
                self._alone.pop(row, None)
                self._sending_alone.discard(row)

    def alone(self, row: int) -> bool:
        """Whether ``row`` goes alone, its PUBACK awaited before anything else is sent (the
        caller sends it now)."""
        if self._closes.get(row, 0) >= ALONE_AFTER:
            self._sending_alone.add(row)
            return True
        return False

    def refused(self, row: int) -> bool:
        """Whether the broker closed the connection on ``row`` often enough, alone, to take
        it as refused; it is forgotten (the caller dead-letters it)."""
        if self._alone.get(row, 0) >= REFUSED_AFTER:
            self.acked([row])
            return True
        return False
