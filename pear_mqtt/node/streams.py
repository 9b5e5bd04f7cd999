"""The ``insights()`` and ``aggregates()`` iterators and ``on_insight`` callbacks of a node:
every received item is fanned out to each of them."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

from .counters import Counters
from .records import ReceivedAggregate, ReceivedInsight

__all__ = ["Stream", "Streams"]

_T = TypeVar("_T")

_SUBSCRIBER_QUEUE = 100_000  # unread items per iterator before the oldest are dropped


class Stream(Generic[_T]):
    """One iterator's buffer and its wake-up."""

    __slots__ = ("event", "queue")

    def __init__(self) -> None:
        self.queue: deque[_T] = deque()
        self.event = asyncio.Event()


class Streams:
    """The open iterators (one bounded buffer each) and the callbacks.

    The receiver appends to the lists it is given (:attr:`insight_streams`,
    :attr:`aggregate_streams`, :attr:`callbacks`) through :meth:`fan_out`; an iterator ends
    once it is drained and :attr:`live` is False (the node has stopped).
    """

    def __init__(self, *, counters: Counters) -> None:
        self._counters = counters
        self.live = False
        """The node is started (its connection supervisor runs): iterators wait for more."""
        self.insight_streams: list[Stream[ReceivedInsight]] = []
        self.aggregate_streams: list[Stream[ReceivedAggregate]] = []
        self.callbacks: list[Callable[[ReceivedInsight], Any]] = []

    def insights(self) -> AsyncIterator[ReceivedInsight]:
        return self._iterate(self.insight_streams)

    def aggregates(self) -> AsyncIterator[ReceivedAggregate]:
        return self._iterate(self.aggregate_streams)

    def on_insight(self, callback: Callable[[ReceivedInsight], Any]) -> Callable[[], None]:
        self.callbacks.append(callback)
        return lambda: self.callbacks.remove(callback) if callback in self.callbacks else None

    def fan_out(self, streams: list[Stream[_T]], item: _T) -> None:
        """Append ``item`` to every stream of ``streams`` (dropping the oldest of a full one)."""
        for stream in streams:
            if len(stream.queue) >= _SUBSCRIBER_QUEUE:
                stream.queue.popleft()
                self._counters.dropped["subscriber_overflow"] += 1
            stream.queue.append(item)
            stream.event.set()

    def wake_all(self) -> None:
        """Wake every iterator (to end, once the node has stopped)."""
        for streams in (self.insight_streams, self.aggregate_streams):
            for stream in streams:
                stream.event.set()

    def _iterate(self, streams: list[Stream[_T]]) -> AsyncIterator[_T]:
        stream: Stream[_T] = Stream()
        streams.append(stream)

        async def iterate() -> AsyncIterator[_T]:
            try:
                while True:
                    while stream.queue:
                        yield stream.queue.popleft()
                    if not self.live:
                        return
                    stream.event.clear()
                    await stream.event.wait()
            finally:
                with contextlib.suppress(ValueError):
                    streams.remove(stream)

        return iterate()
