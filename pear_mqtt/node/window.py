"""Flow control for a node's unacknowledged publishes (insight envelopes, states and pages)."""

from __future__ import annotations

import asyncio

__all__ = ["Window"]


class Window:
    """At most ``count`` unacknowledged publishes and ``nbytes`` bytes (one publish larger
    than that still goes, alone)."""

    __slots__ = ("_bytes", "_count", "_freed", "_limit_bytes", "_limit_count")

    def __init__(self, *, count: int, nbytes: int) -> None:
        self._limit_count, self._limit_bytes = count, nbytes
        self._count = self._bytes = 0
        self._freed = asyncio.Event()

    async def acquire(self, nbytes: int) -> None:
        while self._count and (self._count >= self._limit_count
                               or self._bytes + nbytes > self._limit_bytes):
            self._freed.clear()
            await self._freed.wait()
        self._count += 1
        self._bytes += nbytes

    def release(self, nbytes: int) -> None:
        self._count -= 1
        self._bytes -= nbytes
        self._freed.set()
