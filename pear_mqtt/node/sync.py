"""A blocking facade over :class:`PearNetwork` for scripts that do not use asyncio.

The network runs on an event loop in a background thread; each method submits a coroutine to
it and waits for the result. Received insights are collected by a callback into a bounded
thread-safe queue that :meth:`SyncPearNetwork.receive` reads.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import Any, TypeVar

from ..config.models import NetworkConfig
from ..errors import NotConnectedError
from ..model.insight import MarketInsight, NetworkStatus
from .network import PearNetwork
from .records import Peer, ReceivedInsight, SyncResult

__all__ = ["SyncPearNetwork"]

_T = TypeVar("_T")


class SyncPearNetwork:
    """``PearNetwork`` with blocking calls::

        with SyncPearNetwork(config) as net:
            net.broadcast_market_insight(insight)
            state = net.sync()
            received = net.receive(timeout=5)
    """

    def __init__(self, config: NetworkConfig, *, max_buffered: int = 100_000) -> None:
        self._config = config
        self._received: queue.Queue[ReceivedInsight] = queue.Queue(maxsize=max_buffered)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._network: PearNetwork | None = None
        self.overflow = 0  # insights dropped because nobody called receive() in time

    def _run(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        if self._loop is None:
            coro.close()
            raise NotConnectedError("call connect() first")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def connect(self, *, timeout: float = 10.0) -> None:
        """Start the background loop and connect (raises what ``PearNetwork.connect`` does)."""
        if self._loop is not None:
            return
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="pear-mqtt", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread

        async def start() -> PearNetwork:
            net = PearNetwork(self._config)
            net.on_insight(self._collect)
            await net.connect(timeout=timeout)
            return net

        try:
            self._network = self._run(start())
        except BaseException:
            self._stop_loop()
            raise

    def _collect(self, received: ReceivedInsight) -> None:
        try:
            self._received.put_nowait(received)
        except queue.Full:
            self.overflow += 1

    def _net(self) -> PearNetwork:
        if self._network is None:
            raise NotConnectedError("call connect() first")
        return self._network

    def broadcast_market_insight(self, insight: MarketInsight) -> str:
        """Queue ``insight`` for sharing; returns its item id."""
        return self._run(self._net().broadcast_market_insight(insight))

    def broadcast_many(self, insights: Sequence[MarketInsight]) -> list[str]:
        """Queue a batch of insights in one outbox transaction; returns their item ids."""
        return self._run(self._net().broadcast_many(insights))

    def flush(self, *, timeout: float | None = None) -> None:
        """Block until the broker acknowledged everything broadcast so far."""
        self._run(self._net().flush(timeout=timeout))

    def sync(self, *, timeout: float = 60.0) -> SyncResult:
        """Blocking :meth:`PearNetwork.sync`."""
        return self._run(self._net().sync(timeout=timeout))

    def receive(self, *, timeout: float | None = None) -> ReceivedInsight:
        """The next received insight; :class:`queue.Empty` after ``timeout`` seconds."""
        return self._received.get(timeout=timeout)

    def peers(self) -> list[Peer]:
        return self._net().peers()

    def status(self) -> NetworkStatus:
        return self._net().status()

    def close(self) -> None:
        """Disconnect and stop the background loop."""
        if self._network is not None:
            try:
                self._run(self._network.disconnect(), timeout=15)
            finally:
                self._network = None
        self._stop_loop()

    def _stop_loop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._loop.close()
            self._loop, self._thread = None, None

    def __enter__(self) -> SyncPearNetwork:
        self.connect()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
