"""A connection's received messages not yet taken, bounded by count and bytes.

Above the high water the connection stops reading its socket (TCP then pushes back on the
broker); once the inbox is back at the low water it reads again.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["InboundMessage", "Inbox"]

# Unread inbound messages above which the socket stops being read, and the level at which
# reading resumes.
_HIGH_WATER = 50_000
_LOW_WATER = 10_000
# The same in bytes, so that a flood of large messages cannot grow memory unbounded either.
_HIGH_WATER_BYTES = 32 * 1024 * 1024
_LOW_WATER_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A message the broker delivered."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int = 0  # packet id; what Connection.ack() acknowledges with manual_ack


class Inbox:
    """The queue, its size in bytes and its wake-up; ``pause``/``resume`` stop and restart
    reading the socket (``resume`` does nothing unless reading is paused)."""

    __slots__ = ("_bytes", "_pause", "_queue", "_resume", "event")

    def __init__(self, *, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        self._queue: deque[InboundMessage] = deque()
        self._bytes = 0
        self._pause, self._resume = pause, resume
        self.event = asyncio.Event()
        """Set when a message arrives (and when the connection closes)."""

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, msg: InboundMessage, *, may_pause: bool) -> None:
        """Queue ``msg``; past the high water, pause reading if ``may_pause``."""
        self._queue.append(msg)
        self._bytes += len(msg.payload)
        self.event.set()
        if may_pause and (len(self._queue) >= _HIGH_WATER or self._bytes >= _HIGH_WATER_BYTES):
            self._pause()

    def pop(self) -> InboundMessage:
        """The oldest message (the inbox must not be empty)."""
        msg = self._queue.popleft()
        self._bytes -= len(msg.payload)
        self._settled()
        return msg

    def take(self, limit: int | None = None) -> list[InboundMessage]:
        """The oldest ``limit`` messages (all of them if None)."""
        if limit is None or limit >= len(self._queue):
            items = list(self._queue)
            self._queue.clear()
            self._bytes = 0
        else:
            items = [self._queue.popleft() for _ in range(max(limit, 0))]
            self._bytes -= sum(len(m.payload) for m in items)
        self._settled()
        return items

    def _settled(self) -> None:
        if len(self._queue) <= _LOW_WATER and self._bytes <= _LOW_WATER_BYTES:
            self._resume()
