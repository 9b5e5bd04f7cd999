"""Sync markers: a node publishes a nonce to a topic only it reads and waits for it to come
back, which proves the broker has handled everything sent (and routed) before it."""

from __future__ import annotations

import asyncio
import uuid

from ..transport import Connection

__all__ = ["Markers"]


class Markers:
    """The marker round trips under way, by nonce."""

    def __init__(self) -> None:
        self._topic: str | None = None
        self._waiters: dict[bytes, asyncio.Future[None]] = {}

    def attach(self, topic: str) -> None:
        """Publish markers to ``topic`` (this node's sync topic, set on each ``connect()``)."""
        self._topic = topic

    async def round_trip(self, conn: Connection) -> None:
        """Publish a marker to ourselves and wait for it: the retained burst of every earlier
        subscription has then been delivered."""
        assert self._topic is not None
        nonce = uuid.uuid4().hex.encode()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[nonce] = waiter
        try:
            await conn.publish(self._topic, nonce, qos=1)
            await waiter
        finally:
            self._waiters.pop(nonce, None)

    def arrived(self, payload: bytes) -> None:
        """A message on the sync topic came back: end the round trip it belongs to."""
        waiter = self._waiters.pop(payload, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
